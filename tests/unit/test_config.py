"""NetworkConfig: defaults, validation of every field, and from_env()."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from netvm import ConfigError, NetworkConfig


def test_default_config_is_the_originals() -> None:
    config = NetworkConfig()
    assert config.bridge_name == "fcbr0"
    assert config.vm_subnet == ipaddress.IPv4Network("172.30.0.0/24")
    assert config.host_egress_iface == "eth0"
    assert config.mtu == 1500
    assert config.state_dir == Path("/run/netvm")
    assert str(config.gateway) == "172.30.0.1/24"


def test_config_is_frozen() -> None:
    config = NetworkConfig()
    with pytest.raises(AttributeError):
        config.mtu = 9000  # type: ignore[misc]


@pytest.mark.parametrize(
    ("subnet", "why"),
    [
        ("10.0.0.0/31", "no room for a guest"),
        ("10.0.0.0/32", "no room for a guest"),
        ("not-a-cidr", "CIDR"),
        ("10.0.0.1/24", "host bits set"),
        ("2001:db8::/64", "IPv6"),
        ("", "CIDR"),
        ("10.0.0.0/33", "CIDR"),
    ],
)
def test_bad_subnets_are_refused_naming_field_value_and_rule(subnet: str, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(vm_subnet=subnet)
    message = str(error.value)
    assert "vm_subnet" in message
    assert repr(subnet) in message
    assert "/30 or larger" in message
    assert why in message
    assert error.value.field == "vm_subnet"


def test_a_slash_30_is_the_smallest_subnet() -> None:
    assert NetworkConfig(vm_subnet="192.0.2.0/30").vm_subnet.prefixlen == 30


@pytest.mark.parametrize(
    "name",
    [
        *("", "x" * 16, ".", "..", "a/b", "a:b", "a b", "tab\t", "new\nline", "é" * 8),
        # Names a firewall would read as more than themselves.
        *("!br0", "br+", "br*", 'br"0', "br\\0", "-j", ".x", "br0 ", "\x00"),
    ],
)
@pytest.mark.parametrize("field", ["bridge_name", "host_egress_iface"])
def test_bad_interface_names_are_refused(field: str, name: str) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(**{field: name})  # type: ignore[arg-type]
    assert error.value.field == field
    assert "1 to 15 characters" in str(error.value)


def test_fifteen_bytes_is_the_longest_name() -> None:
    assert NetworkConfig(bridge_name="b" * 15).bridge_name == "b" * 15


def test_bridge_and_egress_must_differ() -> None:
    with pytest.raises(ConfigError, match="host_egress_iface"):
        NetworkConfig(bridge_name="br0", host_egress_iface="br0")


@pytest.mark.parametrize("mtu", [67, 65522, 0, -1, True, 1500.0, "1500"])
def test_bad_mtus_are_refused(mtu: object) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(mtu=mtu)  # type: ignore[arg-type]
    assert error.value.field == "mtu"
    assert "68 to 65521" in str(error.value)


@pytest.mark.parametrize("mtu", [68, 9000, 65521])
def test_mtu_range_edges_are_accepted(mtu: int) -> None:
    assert NetworkConfig(mtu=mtu).mtu == mtu


def test_from_env_uses_defaults_when_unset() -> None:
    assert NetworkConfig.from_env({}) == NetworkConfig()


def test_from_env_reads_every_variable() -> None:
    config = NetworkConfig.from_env(
        {
            "MICROVM_NETWORK_BRIDGE": "br7",
            "MICROVM_NETWORK_SUBNET": "198.51.100.0/24",
            "MICROVM_NETWORK_EGRESS": "up7",
            "MICROVM_NETWORK_MTU": "9000",
            "MICROVM_NETWORK_STATE_DIR": "/tmp/x",
        }
    )
    assert (config.bridge_name, str(config.vm_subnet), config.host_egress_iface) == (
        "br7",
        "198.51.100.0/24",
        "up7",
    )
    assert (config.mtu, config.state_dir) == (9000, Path("/tmp/x"))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MICROVM_NETWORK_BRIDGE", "a-name-far-too-long"),
        ("MICROVM_NETWORK_BRIDGE", ""),
        ("MICROVM_NETWORK_SUBNET", "10.0.0.0/31"),
        ("MICROVM_NETWORK_SUBNET", "garbage"),
        ("MICROVM_NETWORK_SUBNET", ""),
        ("MICROVM_NETWORK_EGRESS", "eth 0"),
        ("MICROVM_NETWORK_MTU", "0"),
        ("MICROVM_NETWORK_MTU", "abc"),
        ("MICROVM_NETWORK_MTU", "1500.5"),
        ("MICROVM_NETWORK_MTU", "-1"),
        ("MICROVM_NETWORK_MTU", ""),
        ("MICROVM_NETWORK_STATE_DIR", ""),
    ],
)
def test_from_env_refuses_a_set_but_invalid_value(variable: str, value: str) -> None:
    """The original fell back silently to the default here; netvm names the variable."""
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({variable: value})
    assert error.value.field == variable
    assert variable in str(error.value)
    assert repr(value) in str(error.value)


def test_replace_revalidates_and_keeps_types() -> None:
    import dataclasses

    config = NetworkConfig(vm_subnet="198.51.100.0/24", state_dir="/tmp/netvm-x")
    assert isinstance(config.vm_subnet, ipaddress.IPv4Network)
    assert config.state_dir == Path("/tmp/netvm-x")
    assert dataclasses.replace(config, mtu=9000).mtu == 9000
    with pytest.raises(ConfigError, match="mtu"):
        dataclasses.replace(config, mtu=10)
    assert config == NetworkConfig(vm_subnet="198.51.100.0/24", state_dir=Path("/tmp/netvm-x"))


@pytest.mark.parametrize("choice", ["auto", "nftables", "iptables"])
def test_the_firewall_choice_is_read_from_the_environment(choice: str) -> None:
    config = NetworkConfig.from_env({"MICROVM_NETWORK_FIREWALL": choice})
    assert config.firewall == choice
    assert NetworkConfig().firewall == "auto"


@pytest.mark.parametrize("value", ["", "nft", "IPTABLES", "legacy", " auto"])
def test_a_bad_firewall_choice_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({"MICROVM_NETWORK_FIREWALL": value})
    assert error.value.field == "MICROVM_NETWORK_FIREWALL"
    assert "auto, nftables, iptables" in str(error.value)
    with pytest.raises(ConfigError) as direct:
        NetworkConfig(firewall=value)  # type: ignore[arg-type]
    assert direct.value.field == "firewall"


# Hostile values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "block"),
    [
        ("0.0.0.0/0", "0.0.0.0/8"),
        ("0.0.0.0/8", "0.0.0.0/8"),
        ("0.1.2.0/24", "0.0.0.0/8"),
        ("127.0.0.0/24", "127.0.0.0/8 (loopback)"),
        ("169.254.10.0/24", "169.254.0.0/16 (link-local)"),
        ("224.0.0.0/24", "224.0.0.0/4 (multicast)"),
        ("239.255.255.0/24", "224.0.0.0/4 (multicast)"),
        ("240.0.0.0/24", "240.0.0.0/4 (reserved"),
        ("255.255.255.252/30", "240.0.0.0/4 (reserved, with the broadcast address)"),
        ("128.0.0.0/1", "169.254.0.0/16 (link-local)"),
    ],
)
def test_subnets_that_cannot_be_a_vm_network_are_refused(subnet: str, block: str) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(vm_subnet=subnet)
    message = str(error.value)
    assert error.value.field == "vm_subnet"
    assert repr(subnet) in message
    assert "a unicast IPv4 network outside" in message
    assert f"overlaps {block.split(' ')[0]}" in message
    assert block in message
    with pytest.raises(ConfigError) as from_env:
        NetworkConfig.from_env({"MICROVM_NETWORK_SUBNET": subnet})
    assert from_env.value.field == "MICROVM_NETWORK_SUBNET"


@pytest.mark.parametrize(
    "subnet",
    ["1.0.0.0/24", "126.255.255.0/24", "169.253.0.0/24", "223.255.255.0/24", "10.0.0.0/8"],
)
def test_unicast_subnets_next_to_the_refused_blocks_are_accepted(subnet: str) -> None:
    assert str(NetworkConfig(vm_subnet=subnet).vm_subnet) == subnet


@pytest.mark.parametrize("name", ["all", "default"])
@pytest.mark.parametrize("field", ["bridge_name", "host_egress_iface"])
def test_names_the_kernel_keeps_for_its_sysctl_directories_are_refused(
    field: str, name: str
) -> None:
    """`ip link add all type bridge` fails with EINVAL: /proc/sys/net/ipv4/conf/all."""
    with pytest.raises(ConfigError) as error:
        NetworkConfig(**{field: name})  # type: ignore[arg-type]
    assert error.value.field == field
    assert "not 'all' or 'default'" in str(error.value)


@pytest.mark.parametrize(
    "mtu",
    [
        "\u0661\u0665\u0660\u0660",  # 1500 in Arabic-Indic digits: int() would read it
        "\u00b2",  # a superscript two: isdigit() is true, int() fails
        "\uff11\uff15\uff10\uff10",  # fullwidth digits
        "1" * 5000,  # longer than int() converts
        "+1500",
        " ",
    ],
)
def test_an_mtu_variable_must_be_ascii_digits(mtu: str) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({"MICROVM_NETWORK_MTU": mtu})
    assert error.value.field == "MICROVM_NETWORK_MTU"
    assert "an integer from 68 to 65521" in str(error.value)


@pytest.mark.parametrize(
    "state_dir", ["", "/run/\x00netvm", "/run/\udcffnetvm", "/run/\ud800", 7, b"/run/netvm", None]
)
def test_a_state_dir_must_be_a_path_that_sqlite_and_the_os_take(state_dir: object) -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig(state_dir=state_dir)  # type: ignore[arg-type]
    assert error.value.field == "state_dir"
    assert "text that UTF-8 can encode, without NUL" in str(error.value)
    if isinstance(state_dir, str):
        with pytest.raises(ConfigError) as from_env:
            NetworkConfig.from_env({"MICROVM_NETWORK_STATE_DIR": state_dir})
        assert from_env.value.field == "MICROVM_NETWORK_STATE_DIR"


@pytest.mark.parametrize(
    "variable",
    [
        "MICROVM_NETWORK_BRIDGE",
        "MICROVM_NETWORK_SUBNET",
        "MICROVM_NETWORK_EGRESS",
        "MICROVM_NETWORK_MTU",
        "MICROVM_NETWORK_STATE_DIR",
        "MICROVM_NETWORK_FIREWALL",
    ],
)
@pytest.mark.parametrize("value", [1500, None, b"x", ["x"], "\udcff"])
def test_from_env_refuses_values_that_are_not_text_naming_the_variable(
    variable: str, value: object
) -> None:
    """A mapping other than os.environ may hold anything: it is still a ConfigError."""
    if value is None or (variable, value) == ("MICROVM_NETWORK_MTU", 1500):
        # None is unset; an int MTU is an MTU.
        NetworkConfig.from_env({variable: value})  # type: ignore[dict-item]
        return
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({variable: value})  # type: ignore[dict-item]
    assert error.value.field == variable


def test_from_env_names_the_variable_when_bridge_and_egress_are_one() -> None:
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({"MICROVM_NETWORK_BRIDGE": "up0", "MICROVM_NETWORK_EGRESS": "up0"})
    assert error.value.field == "MICROVM_NETWORK_EGRESS"
    with pytest.raises(ConfigError) as error:
        NetworkConfig.from_env({"MICROVM_NETWORK_BRIDGE": "eth0"})
    assert error.value.field == "MICROVM_NETWORK_BRIDGE"
    assert "must differ from eth0" in str(error.value)


def test_a_relative_state_dir_is_made_absolute_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge's mark names its store by the state_dir's path: a relative one, resolved
    at each call against that call's working directory, would name another store."""
    monkeypatch.chdir(tmp_path)
    config = NetworkConfig(state_dir="rel/dir")
    assert config.state_dir == tmp_path / "rel" / "dir"
    monkeypatch.chdir("/")
    assert config.state_dir == tmp_path / "rel" / "dir"
    assert NetworkConfig.from_env({"MICROVM_NETWORK_STATE_DIR": "x"}).state_dir == Path("/x")
    # ".." is left to the kernel: after a symlink it is not the symlink's parent.
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    linked = NetworkConfig(state_dir=tmp_path / "link" / ".." / "netvm").state_dir
    assert os.path.realpath(linked) == str(tmp_path / "real" / "netvm")
