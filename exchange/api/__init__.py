"""The HTTP api (Litestar): thin controllers over :mod:`exchange.orders`; see :mod:`exchange.api.app`."""
