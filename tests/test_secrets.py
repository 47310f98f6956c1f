"""Secret sources, substitution and redaction (spec §5)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipelines import secrets as secrets_module
from pipelines.secrets import MissingSecret, SecretsFileError, SecretSource, SecretSyntaxError


def test_yaml_file_then_environment_case_insensitive(tmp_path: Path) -> None:
    file = tmp_path / "secrets.yaml"
    file.write_text("API_TOKEN: from-file-token\nShared: file-wins\nNUMBER: 007\nFLAG: true\nEMPTY:\n")
    source = SecretSource.from_sources(file, environ={"SHARED": "env-loses", "only_env": "env-value"})
    assert source.resolve("$api_token") == "from-file-token"
    assert source.resolve("$Api_Token") == "from-file-token"
    assert source.resolve("$SHARED") == "file-wins"  # the file comes first
    assert source.resolve("$ONLY_ENV") == "env-value"  # then the environment, any case
    assert source.resolve("$NUMBER") == "007"  # scalars exactly as written
    assert source.resolve("$flag") == "true"
    assert source.resolve("$EMPTY") == ""
    assert "only_env" in source and "nope" not in source


def test_dotenv_file(tmp_path: Path) -> None:
    file = tmp_path / "secrets.env"
    file.write_text(textwrap.dedent("""\
        # a comment
        PLAIN=plain-value
        export EXPORTED=exported-value
        DOUBLE="Bearer two words"
        SINGLE='single $NOT_A_REF'
        SPACED = spaced-value   # trailing comment
        EQUALS=a=b=c

        HASH_IN_QUOTES="x # y"
        """))
    source = SecretSource.from_sources(file, environ={})
    assert source.get("plain") == "plain-value"
    assert source.get("EXPORTED") == "exported-value"
    assert source.get("double") == "Bearer two words"
    assert source.get("single") == "single $NOT_A_REF"
    assert source.get("spaced") == "spaced-value"
    assert source.get("equals") == "a=b=c"
    assert source.get("hash_in_quotes") == "x # y"


def test_dotenv_is_sniffed_without_a_known_suffix(tmp_path: Path) -> None:
    file = tmp_path / "secrets.txt"
    file.write_text("A=1\nB=two\n")
    assert SecretSource.from_sources(file, environ={}).get("b") == "two"
    yaml_file = tmp_path / "secrets.conf"
    yaml_file.write_text("A: one\n")
    assert SecretSource.from_sources(yaml_file, environ={}).get("a") == "one"


def test_bad_secrets_files_have_positions(tmp_path: Path) -> None:
    bad_env = tmp_path / "bad.env"
    bad_env.write_text("GOOD=1\n\nno equals sign here\n")
    with pytest.raises(SecretsFileError) as info:
        SecretSource.from_sources(bad_env, environ={})
    assert (info.value.line, info.value.col) == (3, 1)
    assert "NAME=value" in info.value.message

    bad_name = tmp_path / "bad2.env"
    bad_name.write_text("1ABC=x\n")
    with pytest.raises(SecretsFileError, match="not of the form"):
        SecretSource.from_sources(bad_name, environ={})

    nested = tmp_path / "bad.yaml"
    nested.write_text("A: 1\nB:\n  nested: 2\n")
    with pytest.raises(SecretsFileError) as info:
        SecretSource.from_sources(nested, environ={})
    assert info.value.line == 3 and "single value" in info.value.message

    broken = tmp_path / "broken.yml"
    broken.write_text("A: [1,\n")
    with pytest.raises(SecretsFileError, match="YAML syntax error"):
        SecretSource.from_sources(broken, environ={})

    with pytest.raises(SecretsFileError, match="cannot read"):
        SecretSource.from_sources(tmp_path / "missing.env", environ={})


def test_substitution_rules() -> None:
    source = SecretSource({"TOKEN": "tok-123456", "HOST": "example.org"})
    assert source.resolve("$TOKEN") == "tok-123456"
    assert source.resolve("${TOKEN}") == "tok-123456"
    assert source.resolve("Bearer ${TOKEN}") == "Bearer tok-123456"
    assert source.resolve("https://${host}/x?k=${Token}") == "https://example.org/x?k=tok-123456"
    assert source.resolve("price $$5") == "price $5"
    assert source.resolve("$$TOKEN") == "$TOKEN"  # escaped: not a reference
    assert source.resolve("$${TOKEN}") == "${TOKEN}"
    assert source.resolve("no dollars") == "no dollars"
    # a stray '$' that starts no reference stays as written
    assert source.resolve("Bearer $TOKEN") == "Bearer $TOKEN"
    assert source.resolve("$") == "$"
    assert source.resolve("$1abc") == "$1abc"
    assert source.resolve_tree({"h": {"Authorization": "Bearer ${TOKEN}"}, "l": ["$HOST", 3, None]}) == {
        "h": {"Authorization": "Bearer tok-123456"}, "l": ["example.org", 3, None]}


def test_missing_and_malformed_references() -> None:
    source = SecretSource({"A": "x"})
    with pytest.raises(MissingSecret) as info:
        source.resolve("$NOT_THERE")
    assert info.value.name == "NOT_THERE"
    assert isinstance(info.value, KeyError)
    assert "NOT_THERE" in str(info.value)
    with pytest.raises(MissingSecret):
        source.resolve("Bearer ${NOT_THERE}")
    for bad in ("${not closed", "${bad name}", "${}", "${1A}"):
        with pytest.raises(SecretSyntaxError):
            source.resolve(bad)
    assert source.references("Bearer ${A} and ${B}") == ["A", "B"]
    assert source.references("$A") == ["A"]


def test_redaction_of_used_values_only() -> None:
    source = SecretSource({"LONG": "s3cr3t-value-for-redaction", "SHORT": "abc", "UNUSED": "never-used-9876"})
    assert source.redact("nothing used yet s3cr3t-value-for-redaction") == (
        "nothing used yet s3cr3t-value-for-redaction")
    source.resolve("Bearer ${LONG}")
    source.resolve("$SHORT")
    text = "got s3cr3t-value-for-redaction and abc and never-used-9876"
    assert source.redact(text) == "got *** and abc and never-used-9876"
    # the process-wide redactor knows every value resolved by any source
    assert secrets_module.redact(text) == "got *** and abc and never-used-9876"
    other = SecretSource({"X": "another-process-secret"})
    other.resolve("${X}")
    assert secrets_module.redact("another-process-secret / s3cr3t-value-for-redaction") == "*** / ***"


def test_longer_secret_redacted_whole_when_it_contains_a_shorter_one() -> None:
    source = SecretSource({"A": "abcd-1111", "B": "abcd-1111-extra"})
    source.resolve("$A")
    source.resolve("$B")
    assert source.redact("abcd-1111-extra") == "***"
    assert secrets_module.redact("[abcd-1111-extra]") == "[***]"
