"""PostgreSQL and the Redis mirror: schema, migrations, writes, reads, partitions, the device
registry, liveness and replay.
"""
