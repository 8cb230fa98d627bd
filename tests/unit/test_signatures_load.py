"""agent/signatures.py, loading only: the packaged catalog, and malformed tables each raising
SignatureError that names the bad entry. (Matching is tested in test_signatures_match.py.)"""

from __future__ import annotations

import pytest

from agent.errors import SignatureError
from agent.signatures import load_catalog
from agent.types import FramePattern, HangClass

# --- builders: TOML text, values written as TOML literals; None leaves the key out -----------


def role_toml(
    *, name: str | None = '"waiter"', stuck: str | None = "true",
    any_of: str | None = '[{ function = "^PQ" }]', all_of: str | None = None,
    none_of: str | None = None, header: str = "[[signature.role]]",
) -> str:
    keys = {"name": name, "stuck": stuck, "any_of": any_of, "all_of": all_of, "none_of": none_of}
    return "\n".join([header, *(f"{k} = {v}" for k, v in keys.items() if v is not None)]) + "\n"


def signature_toml(
    *, name: str | None = '"demo_hang"', summary: str | None = '"threads hang"',
    remedy: str | None = '"restart the worker"', roles: tuple[str, ...] = (role_toml(),),
    header: str = "[[signature]]",
) -> str:
    keys = {"name": name, "summary": summary, "remedy": remedy}
    body = "\n".join([header, *(f"{k} = {v}" for k, v in keys.items() if v is not None)])
    return body + "\n" + "".join(roles)


def idle_toml(*, name: str = '"parked"', top: str | None = '{ function = "wait$" }',
              under: str | None = None) -> str:  # fmt: skip
    keys = {"name": name, "top": top, "under": under}
    return "\n".join(["[[idle]]", *(f"{k} = {v}" for k, v in keys.items() if v is not None)]) + "\n"


# --- the packaged catalog ----------------------------------------------------------------------


def test_packaged_catalog_loads() -> None:
    catalog = load_catalog()
    assert "libpq_ssl_with_https" in catalog.names
    assert "libpq_ssl_lock_callback" in catalog.names
    assert len(set(catalog.names)) == len(catalog.names)
    assert catalog.idle, "idle rules are what keep pool threads from being called stuck"
    for signature in catalog.signatures:
        assert signature.summary
        assert signature.references, f"{signature.name}: a reference link for the incident"
        if signature.hang_class is HangClass.DEADLOCK:
            assert "restart" in signature.remedy.lower(), signature.name  # only a kill ends it
        assert signature.proof is not None or any(
            role.stuck or role.spinning for role in signature.roles
        ), signature.name
    assert catalog.proven("cycle") is not None and catalog.proven("orphan") is not None


def test_packaged_libpq_https_roles() -> None:
    sig = next(s for s in load_catalog().signatures if s.name == "libpq_ssl_with_https")
    roles = {role.name: role for role in sig.roles}
    assert set(roles) == {"libpq", "https"}
    assert roles["libpq"].stuck is True
    assert roles["https"].stuck is False
    assert roles["https"].none_of  # a second libpq thread is not "another OpenSSL user"


def test_minimal_catalog_from_text() -> None:
    text = idle_toml() + signature_toml(roles=(
        role_toml(name='"libpq"', any_of='[{ module = "libpq", function = "^PQ" }]'),
        role_toml(name='"https"', stuck=None, any_of=None,
                  all_of='[{ file = "ssl\\\\.py$" }]', none_of='[{ file = "psycopg2/" }]'),
    ))  # fmt: skip
    catalog = load_catalog(text)
    assert catalog.names == ("demo_hang",)
    [sig] = catalog.signatures
    assert (sig.summary, sig.remedy) == ("threads hang", "restart the worker")
    libpq, https = sig.roles
    assert libpq.any_of == (FramePattern(function="^PQ", module="libpq"),)
    assert libpq.stuck is True
    assert https.stuck is False
    assert https.all_of == (FramePattern(file="ssl\\.py$"),)
    assert https.none_of == (FramePattern(file="psycopg2/"),)
    assert catalog.idle[0].name == "parked"


def test_empty_text_is_an_empty_catalog() -> None:
    catalog = load_catalog("")
    assert (catalog.signatures, catalog.idle) == ((), ())


# --- malformed tables --------------------------------------------------------------------------

OK = signature_toml(name='"first_ok"')

MALFORMED = {
    "bad regex": (
        signature_toml(roles=(role_toml(any_of='[{ function = "PQ(" }]'),)),
        ["signature[0]", "demo_hang", "role[0]", "any_of[0]", "bad regular expression"],
    ),
    "bad regex in second signature": (
        OK + signature_toml(roles=(role_toml(all_of='[{ module = "[libpq" }]', any_of=None),)),
        ["signature[1]", "demo_hang", "all_of[0]", "[libpq"],
    ),
    "regex that is not text": (
        signature_toml(roles=(role_toml(any_of="[{ function = 5 }]"),)),
        ["demo_hang", "any_of[0].function", "bad regular expression"],
    ),
    "unknown pattern key": (
        signature_toml(roles=(role_toml(any_of='[{ function = "^PQ", fn = "x" }]'),)),
        ["demo_hang", "any_of[0]", "unknown pattern keys", "fn"],
    ),
    "empty pattern": (
        signature_toml(roles=(role_toml(any_of="[{}]"),)),
        ["demo_hang", "any_of[0]", "frame pattern"],
    ),
    "pattern that is not a table": (
        signature_toml(roles=(role_toml(any_of='["^PQ"]'),)),
        ["demo_hang", "any_of[0]", "frame pattern"],
    ),
    "patterns that are not a list": (
        signature_toml(roles=(role_toml(any_of='{ function = "^PQ" }'),)),
        ["demo_hang", "any_of", "list"],
    ),
    "missing name": (
        OK + signature_toml(name=None),
        ["signature[1]", "'name'"],
    ),
    "blank name": (
        signature_toml(name='"  "'),
        ["signature[0]", "'name'"],
    ),
    "missing remedy": (
        OK + signature_toml(remedy=None),
        ["signature[1]", "demo_hang", "'remedy'"],
    ),
    "missing summary": (
        signature_toml(summary=None),
        ["signature[0]", "demo_hang", "'summary'"],
    ),
    "role without name": (
        signature_toml(roles=(role_toml(), role_toml(name=None))),
        ["demo_hang", "role[1]", "'name'"],
    ),
    "role with neither any_of nor all_of": (
        signature_toml(roles=(role_toml(), role_toml(name='"https"', any_of=None))),
        ["demo_hang", "role[1]", "any_of or all_of"],
    ),
    "role with only none_of": (
        signature_toml(roles=(role_toml(any_of=None, none_of='[{ file = "x" }]'),)),
        ["demo_hang", "role[0]", "any_of or all_of"],
    ),
    "no stuck role": (
        signature_toml(roles=(role_toml(stuck="false"), role_toml(stuck=None))),
        ["demo_hang", "stuck"],
    ),
    "no roles": (
        signature_toml(roles=()),
        ["demo_hang", "role"],
    ),
    "duplicate names": (
        signature_toml() + OK + signature_toml(),
        ["duplicate", "demo_hang"],
    ),
    "idle rule with a bad regex": (
        idle_toml() + idle_toml(top='{ file = "(gunicorn" }'),
        ["idle[1]", "top", "bad regular expression"],
    ),
    "idle rule without top": (
        idle_toml(top=None),
        ["idle[0]", "top"],
    ),
    "idle rule with unknown key in under": (
        idle_toml(under='{ frame = "x" }'),
        ["idle[0]", "under", "unknown pattern keys"],
    ),
    "invalid TOML": (
        'name = "unterminated\n',
        ["signatures TOML", "line 1"],
    ),
    # A plausible slip: [signature] / [signature.role] (one table) instead of [[...]] (array).
    "signature written as a single table": (
        signature_toml(header="[signature]"),
        ["signature"],
    ),
    "role written as a single table": (
        signature_toml(roles=(role_toml(header="[signature.role]"),)),
        ["demo_hang", "role"],
    ),
    # TOML has booleans; the string "false" must not silently mean true.
    "stuck as a string": (
        signature_toml(roles=(role_toml(), role_toml(name='"other"', stuck='"false"'))),
        ["demo_hang", "role[1]", "stuck"],
    ),
}


@pytest.mark.parametrize(("text", "words"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_catalog_names_the_entry(text: str, words: list[str]) -> None:
    with pytest.raises(SignatureError) as caught:
        load_catalog(text)
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_signature_error_reason() -> None:
    with pytest.raises(SignatureError) as caught:
        load_catalog(signature_toml(roles=()))
    assert caught.value.reason == "signatures"
