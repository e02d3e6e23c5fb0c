"""What devices and operators rely on: topics, payloads, canonical messages, conversion and the
reasons a message is refused. Imports nothing else of the project.
"""
