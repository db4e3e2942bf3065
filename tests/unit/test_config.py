"""Configuration: options over NANOIOT_* variables over defaults, every problem reported at once."""

import os

import pytest

from nanoiot.config import Config
from nanoiot.errors import ConfigError
from nanoiot.rpc.model import SubmitStrategy


def test_defaults_match_the_documented_ports_and_database():
    config = Config.from_sources({}, environ={})
    assert (config.http_port, config.mqtt_port, config.coap_port) == (8080, 1883, 5683)
    assert config.database == "sqlite:///nanoiot.db"
    assert config.demo is False
    assert config.rpc_strategy is SubmitStrategy.BURST


def test_environment_variables_fill_options_that_were_not_given():
    config = Config.from_sources({"http-port": None}, environ={"NANOIOT_HTTP_PORT": "9090", "NANOIOT_DEMO": "1"})
    assert config.http_port == 9090
    assert config.demo is True


def test_an_explicit_option_wins_over_the_environment():
    config = Config.from_sources({"mqtt-port": "2883"}, environ={"NANOIOT_MQTT_PORT": "3883"})
    assert config.mqtt_port == 2883


def test_strategy_names_are_case_insensitive():
    config = Config.from_sources({"rpc-strategy": "sequential_on_ack_from_device"}, environ={})
    assert config.rpc_strategy is SubmitStrategy.SEQUENTIAL_ON_ACK_FROM_DEVICE


def test_every_bad_value_is_reported_together_in_one_line():
    with pytest.raises(ConfigError) as caught:
        Config.from_sources(
            {"http-port": "99999", "mqtt-port": "x", "database": "mysql://h/db", "rpc-strategy": "fast"}, environ={}
        )
    message = str(caught.value)
    assert "\n" not in message
    for fragment in ("--http-port='99999'", "--mqtt-port='x'", "--database='mysql://h/db'", "--rpc-strategy='fast'"):
        assert fragment in message


def test_an_environment_variable_with_a_bad_value_is_named_in_the_error():
    with pytest.raises(ConfigError, match="NANOIOT_RPC_QOS"):
        Config.from_sources({}, environ={"NANOIOT_RPC_QOS": "high"})


def test_qos_above_one_is_refused():
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        Config.from_sources({"rpc-qos": "2"}, environ={})


# -- cluster options -------------------------------------------------------------------------------------------------

POSTGRES = "postgresql://nanoiot@db.example/nanoiot"


def test_cluster_options_default_to_a_single_process():
    config = Config.from_sources({}, environ={})
    assert (config.cluster, config.reuse_port, config.node_id) == (False, False, "")
    assert (config.heartbeat_interval, config.dead_after, config.route_timeout) == (2.0, 10.0, 10000)


def test_cluster_options_are_read_from_options_and_environment():
    config = Config.from_sources(
        {"database": POSTGRES, "node-id": "edge-1", "heartbeat-interval": "0.5", "route-timeout": "2500"},
        environ={"NANOIOT_CLUSTER": "true", "NANOIOT_REUSE_PORT": "1", "NANOIOT_DEAD_AFTER": "1.5"},
    )
    assert (config.cluster, config.reuse_port, config.node_id) == (True, True, "edge-1")
    assert (config.heartbeat_interval, config.dead_after, config.route_timeout) == (0.5, 1.5, 2500)


def test_a_cluster_on_sqlite_is_refused_in_one_clear_line():
    with pytest.raises(ConfigError) as caught:
        Config.from_sources({"cluster": True, "database": "sqlite:///nodes.db"}, environ={})
    assert str(caught.value) == (
        "--cluster needs a PostgreSQL --database (sqlite:///nodes.db cannot be shared by several processes)"
    )


def test_a_cluster_on_the_default_database_is_refused_too():
    with pytest.raises(ConfigError, match="--cluster needs a PostgreSQL --database"):
        Config.from_sources({}, environ={"NANOIOT_CLUSTER": "yes"})


def test_a_cluster_on_postgresql_is_accepted():
    assert Config.from_sources({"cluster": True, "database": POSTGRES}, environ={}).cluster is True


def test_the_node_name_is_the_node_id_when_given():
    assert Config.from_sources({"node-id": "rack2-a"}, environ={}).node_name == "rack2-a"


def test_the_node_name_defaults_to_host_name_and_http_port(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "gw7")
    assert Config.from_sources({"http-port": "9000"}, environ={}).node_name == "gw7:9000"


@pytest.mark.parametrize("node_id, reason", [("node 1", "whitespace"), ("a\tb", "whitespace"),
                                             ("n" * 201, "at most 200")])
def test_a_node_id_with_whitespace_or_too_long_is_refused(node_id, reason):
    with pytest.raises(ConfigError, match=reason):
        Config.from_sources({"node-id": node_id}, environ={})


def test_a_node_id_of_200_characters_is_accepted():
    assert Config.from_sources({"node-id": "n" * 200}, environ={}).node_id == "n" * 200


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_the_heartbeat_interval_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match="--heartbeat-interval"):
        Config.from_sources({"heartbeat-interval": value}, environ={})


@pytest.mark.parametrize("interval, dead_after", [("2", "4"), ("5", "10"), ("2", "1")])
def test_dead_after_must_be_more_than_twice_the_heartbeat_interval(interval, dead_after):
    with pytest.raises(ConfigError) as caught:
        Config.from_sources({"heartbeat-interval": interval, "dead-after": dead_after}, environ={})
    assert "--dead-after" in str(caught.value) and "--heartbeat-interval" in str(caught.value)


def test_dead_after_just_over_twice_the_interval_is_accepted():
    config = Config.from_sources({"heartbeat-interval": "2", "dead-after": "4.01"}, environ={})
    assert config.dead_after == 4.01


def test_the_route_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="--route-timeout='0'"):
        Config.from_sources({"route-timeout": "0"}, environ={})


def test_cluster_problems_are_reported_with_the_others_in_one_line():
    with pytest.raises(ConfigError) as caught:
        Config.from_sources({"cluster": True, "dead-after": "3", "node-id": "a b", "http-port": "x"}, environ={})
    message = str(caught.value)
    assert "\n" not in message
    for fragment in ("--cluster needs", "--dead-after=3", "--node-id='a b'", "--http-port='x'"):
        assert fragment in message


# -- the twistd options: booleans that default to off are flags ----------------------------------------------------


def twistd_options(argv, monkeypatch, environ=None):
    from twisted.plugins.nanoiot_plugin import Options

    for name in [n for n in os.environ if n.startswith("NANOIOT_")]:
        monkeypatch.delenv(name)
    for name, value in (environ or {}).items():
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions(argv)
    return options.config


def test_cluster_and_reuse_port_are_twistd_flags(monkeypatch):
    config = twistd_options(["--cluster", "--reuse-port", "--database", POSTGRES, "--node-id", "n-2"], monkeypatch)
    assert (config.cluster, config.reuse_port, config.node_id, config.demo) == (True, True, "n-2", False)


def test_an_absent_flag_leaves_the_environment_variable_in_charge(monkeypatch):
    config = twistd_options(["--database", POSTGRES], monkeypatch, {"NANOIOT_CLUSTER": "1", "NANOIOT_DEMO": "1"})
    assert (config.cluster, config.demo, config.reuse_port) == (True, True, False)


def test_gc_freeze_still_takes_a_value(monkeypatch):
    assert twistd_options(["--gc-freeze", "false"], monkeypatch).gc_freeze is False
    assert twistd_options([], monkeypatch).gc_freeze is True


def test_a_twistd_cluster_on_sqlite_exits_with_code_2(monkeypatch, capsys):
    with pytest.raises(SystemExit) as caught:
        twistd_options(["--cluster"], monkeypatch)
    assert caught.value.code == 2
    assert "--cluster needs a PostgreSQL --database" in capsys.readouterr().err
