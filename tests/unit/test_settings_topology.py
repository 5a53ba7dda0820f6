import pytest
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError

from hybridrag.agents.settings import Settings, settings_table
from hybridrag.agents.kafka.topology import load_topology


def test_every_topic_has_a_dlq_and_the_prefix_applies():
    topo = load_topology("p-")
    assert set(topo.topics) == {"documents", "queries", "answers", "generated-documents", "retention-updates"}
    names = [n for n, *_ in topo.all_names()]
    assert all(n.startswith("p-") for n in names)
    assert {t.dlq for t in topo.topics.values()} <= set(names)


def test_env_vars_reach_settings(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("HYBRIDRAG_QUERY_BATCH_MAX", "32")
    monkeypatch.setenv("REDIS_URL", "rediss://u:p@r:6380/1")
    s = Settings()
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092" and s.query_batch_max == 32
    assert s.redis_url.startswith("rediss://")


def test_sasl_settings_reach_aiokafka_and_faust_and_the_password_stays_hidden():
    from hybridrag.agents.kafka.faust_config import faust_settings

    s = Settings(kafka_bootstrap_servers="k:9093", kafka_security_protocol="SASL_SSL",
                 kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc", kafka_sasl_password="hunter2")
    kw = s.kafka_client_kwargs()
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512" and kw["sasl_plain_password"] == "hunter2"
    assert kw["ssl_context"] is not None
    creds = faust_settings(s)["broker_credentials"]
    assert creds.username == "svc" and creds.password == "hunter2" and str(creds.mechanism.value) == "SCRAM-SHA-512"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_bad_values_are_validation_errors():
    with pytest.raises(ValidationError):
        Settings(chunk_size=10, chunk_overlap=10)
    with pytest.raises(ValidationError):
        Settings(encoder="nope")


def test_the_settings_table_documents_every_field():
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert f"| {name} |" in table and field.description


@hsettings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["query_batch_max", "chunk_size", "chunk_overlap", "encoder", "top_k",
                                        "kafka_security_protocol", "min_score", "web_port"]),
                       st.one_of(st.text(max_size=8), st.integers(-5, 500), st.floats(allow_nan=True))))
def test_fuzzed_settings_raise_only_validation_errors(values):
    try:
        Settings(**values)
    except ValidationError:
        pass


def test_the_readme_lists_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"| {name} |" not in readme]
    assert not missing, f"run `hybridrag settings --markdown` and update the README: {missing}"
