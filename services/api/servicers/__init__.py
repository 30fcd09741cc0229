"""The gRPC servicers, one module per service: each validates requests, calls the data-access
layer and converts the answers. They hold no SQL and no business state; errors become canonical
statuses in ``services.api._rpc``. What they share about requests is public in ``requests``.
"""
