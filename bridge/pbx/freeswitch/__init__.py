"""FreeSWITCH: the Event Socket (connection.py, link.py), unicast L16 media (unicast.py,
ports.py), one backend (backend.py)."""
