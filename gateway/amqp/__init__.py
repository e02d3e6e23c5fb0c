"""RabbitMQ: the topology, connections, publishing with confirms, acknowledgements, broker accounts
and the devices' access rules.
"""
