"""The heartbeat gateway's shared core, by concern; dependencies point one way:

    contract  <-  runtime  <-  amqp, storage  <-  bridge, worker, api, cli
                                                   devtools (never imported by a service)

One heartbeat, in order: the device's bytes are converted by `contract.conversion` (bridge, or
the api's ingest), published with confirms by `amqp.publisher`, stored by `storage.writes`
(worker), mirrored by `storage.mirror`, and read back by `storage.reads` (api).
"""

__version__ = "0.1.0"
