"""Wire formats as pure objects: bytes (or text) in, events out. No sockets, no clocks.

Each module here is fed by one thin asyncio module elsewhere in the package.
"""
