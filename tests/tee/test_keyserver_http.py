def test_clients_are_counted_by_address_and_ipv6_by_prefix() -> None:
    from plinius.tee.keyserver import _client_key

    assert _client_key("192.0.2.7") == "192.0.2.7"
    assert _client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert _client_key("2001:db8:1:2::1") == _client_key("2001:db8:1:2:ffff::9")
    assert _client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert _client_key("2001:db8:1:3::1") != _client_key("2001:db8:1:2::1")


def test_clip_bounds_client_chosen_values() -> None:
    from plinius.tee.audit import clip

    assert clip(b"/v1/\xff\n") == "/v1/\\xff\n"
    assert clip("x" * 1000) == "x" * 200 + "..."
    assert clip("short") == "short"
