"""Serving requests: everything between a decoded request and the frames that answer it.

Nothing here touches a socket. A ``Connection`` is given a ``send`` function by its
transport (the WebSocket server, or a test), and the ``Router`` serves its requests through
handlers registered per request type. See docs/architecture.md.
"""
