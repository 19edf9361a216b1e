"""Order services behind the api: accepting commands into the log and reading the exchange's state.

Every function here is async, takes the api's psycopg pool (:class:`~exchange.db.engines.AsyncPool`) or one of
its connections (:data:`~exchange.db.engines.AsyncPgConnection`) and plain arguments, and returns plain dataclasses
(never wire types). Writes happen in ONE transaction per call; the matcher (not this package) decides what a
command means.
"""
