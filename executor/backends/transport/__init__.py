"""How a backend reaches its server over HTTP: the `Transport` seam (base), the lean HTTP/1.1 pool
(http1, http1_connection), aiohttp for proxies and compression (aiohttp), and the chooser (choose)."""
