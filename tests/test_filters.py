"""Filter matching exactly per spec §3."""

from __future__ import annotations

import pytest

from pipelines.filters import FilterConfig

CT = "application/json"


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # exact, trailing slashes stripped on both sides
        ("/images", "/images", True),
        ("/images", "/images/", True),
        ("/images/", "/images", True),
        ("/images//", "/images/", True),
        ("/images", "/images2", False),
        ("/images", "/images/x", False),
        ("/images", "/Images", False),
        ("/", "/", True),
        ("/", "/x", False),
        # trailing '*': raw prefix, no stripping
        ("/temp/*", "/temp/", True),
        ("/temp/*", "/temp/x", True),
        ("/temp/*", "/temp/x/y", True),
        ("/temp/*", "/temp", False),
        ("/blockupload*", "/blockupload_1", True),
        ("/blockupload*", "/blockupload", True),
        ("/blockupload*", "/block", False),
        ("/data*", "/data/block_upload", True),
        ("/*", "/anything", True),
        ("/*", "", False),
        # '*' alone matches every path
        ("*", "/a/b", True),
        ("*", "", True),
        ("*", "/", True),
    ],
)
def test_path_matching(pattern: str, path: str, expected: bool) -> None:
    assert FilterConfig(path=pattern).matches(path, CT) is expected


def test_missing_keys_match_anything() -> None:
    f = FilterConfig()
    assert f.matches("/x", "image/png")
    assert f.matches("", "")
    assert FilterConfig(content_type="image/png").matches("/any/path", "image/png")
    assert FilterConfig(path="/a").matches("/a", "whatever/type")


def test_content_type_is_exact() -> None:
    f = FilterConfig(path="/a", content_type="application/json")
    assert f.matches("/a", "application/json")
    assert not f.matches("/a", "application/json; charset=utf-8")
    assert not f.matches("/a", "Application/JSON")
    assert not f.matches("/a", "application/cbor")
    assert not f.matches("/b", "application/json")
    # no wildcards in content types
    assert not FilterConfig(content_type="image/*").matches("/a", "image/png")


@pytest.mark.parametrize("pattern", ["/a*b", "**", "/a/**", "*/x", "/*/x"])
def test_star_anywhere_but_last_is_rejected(pattern: str) -> None:
    with pytest.raises(ValueError, match="may only be the last character"):
        FilterConfig(path=pattern)


def test_filters_compare_equal_by_what_was_written() -> None:
    assert FilterConfig("/a", "x/y") == FilterConfig("/a", "x/y")
    assert FilterConfig("/a") != FilterConfig("/a/")
    assert FilterConfig("/a*").describe() == "path=/a*"
    assert FilterConfig().describe() == "everything"
