"""Messaging between processes: partition routing, coalesced wake-ups, dramatiq broker, result fan-out.

Nothing here carries order data: messages only say *when* to look at a symbol. What happens is decided by the
command log in Postgres under the symbol's advisory lock.
"""
