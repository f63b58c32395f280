"""What any peer needs to speak to a Lloom network: wire messages, subjects, errors and the client."""
