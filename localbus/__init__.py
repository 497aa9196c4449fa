"""Local AMQP 1.0 broker that the azure-servicebus SDK can use in place of Azure.

Run it with `python -m localbus` (or `orders-consumer broker`), or from tests with
`localbus.testing.run_broker()` / `run_broker_process()` and the fixtures in
`localbus.pytest_plugin`. It is a development and test broker: entities live in
memory unless `--data-dir` keeps them in SQLite.

NOTE: SASL PLAIN is not offered because the python-qpid-proton 0.40 wheel has no
Cyrus SASL; clients authenticate with ANONYMOUS plus a CBS token, as the SDK does
with `UseDevelopmentEmulator=true`.
"""
