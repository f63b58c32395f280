"""Plain helpers shared by test modules (fixtures live in tests/conftest.py).

`wait` owns every bounded wait (`within`, and `eventually` for conditions no
event announces), `processes` the console scripts run as subprocesses,
`jobs` the requests tests send, `clock` a clock tests move by hand.
"""
