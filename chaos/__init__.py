"""``python -m chaos``: randomized fault injection checked against a model.

From a seed, it generates workflows (plans, inputs, how each pause is answered) and a
model of what each must end as; runs them on PostgreSQL, Redis, Celery workers, beat
and, with Kafka, a Kafka-protocol broker (Tansu), the bridge, the relay and an agent
(``chassis agent``), all of them its own processes and services; injects faults on a
schedule (workers SIGKILLed and SIGTERMed, Redis restarted empty, PostgreSQL stopped
and started, the bridge, relay and agent killed, tasks and Kafka answers delivered
twice, step tasks revoked through Celery); and checks every workflow against the
model. Never collected by pytest.
"""
