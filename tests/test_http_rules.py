"""The request rules both traffic paths share: nothing leaves the agent's root."""

from __future__ import annotations

import pytest

from agentapi_proxy.errors import InvalidArgument
from agentapi_proxy.http_rules import check_headers, check_path, check_query, end_to_end_headers


@pytest.mark.parametrize(
    "path",
    [
        "/a/.\t./.\t./b",  # HTTP clients drop the TAB: this was /a/../../b
        "/.\t./x",
        "/\t/x",
        "/%2e\t%2e/x",
        "/a\x0bb",
        "/a\x7fb",
        "/a b",
        "/a#b",
        "/a?b",
        "/a\r\nb",
        "/../x",
        "/%2e%2e/x",
        "/%252e%252e/x",
        "/a%2fb",
        "/a%5cb",
        "/a\\b",
        "//evil.example/x",
        "http://evil.example/x",
        "relative",
        "/caf\u00e9",
        "/%zz",
    ],
)
def test_paths_that_could_leave_the_agent_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_path(path)


@pytest.mark.parametrize("path", ["/", "/status", "/a/b.c/d", "/a%20b", "/x:y@z", "/...x", "/~u"])
def test_ordinary_paths_pass_unchanged(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("query", ["a=1 HTTP/1.0", "a=\x01", "a=\x7f", "a=\t", "a=#", "a=\u00e9"])
def test_queries_that_would_break_the_request_line_are_refused(query: str) -> None:
    with pytest.raises(InvalidArgument):
        check_query(query)


def test_ordinary_queries_pass() -> None:
    assert check_query("a=1&b=%20x/y?z") == "a=1&b=%20x/y?z"


@pytest.mark.parametrize(
    "headers",
    [
        [("X-A", "a\x01b")],
        [("X-A", "a\x7fb")],
        [("X-A", "a\nb")],
        [("Bad Name", "v")],
        [("Content-Length", "abc")],
        [("Content-Length", "-1")],
        [("Content-Length", "5"), ("Content-Length", "7")],
        [("Content-Length", "5, 7")],
    ],
)
def test_malformed_headers_and_ambiguous_lengths_are_refused(
    headers: list[tuple[str, str]],
) -> None:
    with pytest.raises(InvalidArgument):
        check_headers(headers)


def test_content_length_is_returned_and_tabs_are_fine_in_values() -> None:
    assert check_headers([("Content-Length", "12"), ("X-A", "a\tb")]) == 12
    assert check_headers([("Content-Length", "12"), ("content-length", "12")]) == 12
    assert check_headers([("X-A", "b")]) is None


def test_connection_named_and_hop_by_hop_headers_are_dropped() -> None:
    kept = end_to_end_headers(
        [("Connection", "X-Secret, close"), ("X-Secret", "1"), ("Keep-Alive", "5"), ("X-Ok", "2")]
    )
    assert kept == [("X-Ok", "2")]


def test_too_many_headers_are_refused() -> None:
    from agentapi_proxy.http_rules import MAX_HEADERS

    check_headers([("X-N", "1")] * MAX_HEADERS)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_HEADERS}"):
        check_headers([("X-N", "1")] * (MAX_HEADERS + 1))
