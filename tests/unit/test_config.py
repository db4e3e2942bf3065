"""Configuration: options over NANOIOT_* variables over defaults, every problem reported at once."""

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
