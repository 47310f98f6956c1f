"""Every kind of mistake in a pipeline file is reported as FILE:LINE:COL, all at once,
never as a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipelines import secrets as secrets_module
from pipelines.config import Problem, load_pipelines
from pipelines.secrets import SecretSource


def load(tmp_path: Path, text: str, name: str = "p.yaml", secrets: SecretSource | None = None):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path, load_pipelines([path], secrets or SecretSource({}))


def one(problems: list[Problem], needle: str) -> Problem:
    found = [p for p in problems if needle in p.message]
    assert len(found) == 1, f"expected one problem with {needle!r}, got {[str(p) for p in problems]}"
    return found[0]


def at(problem: Problem) -> tuple[int, int]:
    return problem.position.line, problem.position.col


def test_yaml_syntax_error_has_its_position(tmp_path: Path) -> None:
    path, result = load(tmp_path, """\
        steps:
          - name: a
            transformer: {type: data-url
          - name: b
        """)
    assert result.pipelines == []
    problem = one(result.problems, "YAML syntax error")
    assert at(problem) == (4, 9)
    assert "started at line 3" in problem.message
    assert str(problem).startswith(f"{path}:4:9: YAML syntax error")


def test_tab_indentation_is_a_syntax_error(tmp_path: Path) -> None:
    _, result = load(tmp_path, "steps:\n\t- name: a\n")
    assert at(one(result.problems, "YAML syntax error")) == (2, 1)


@pytest.mark.parametrize(
    ("text", "needle", "position"),
    [
        ("version: v1\nfilter: {path: /a}\nstpes: []\n",
         "unknown key 'stpes' in the pipeline document; did you mean 'steps'?", (3, 1)),
        ("filter:\n  path: /a\n  contenttype: application/json\nsteps:\n  - name: a\n"
         "    destination: {type: lightdb-stream}\n", "unknown key 'contenttype' in 'filter'; did you mean "
         "'content_type'?", (3, 3)),
        ("steps:\n  - name: a\n    destination: {type: lightdb-stream}\n    retries: 3\n",
         "unknown key 'retries' in step 'a'; did you mean 'retry'?", (4, 5)),
        ("steps:\n  - name: a\n    destination:\n      type: lightdb-stream\n      params: {}\n",
         "unknown key 'params' in step 'a' destination; did you mean 'parameters'?", (5, 7)),
        ("pipelines:\n  x:\n    steps: [{name: a, destination: {type: lightdb-stream}}]\nextra: 1\n",
         "unknown key 'extra' in the pipelines file", (4, 1)),
        ("steps:\n  - name: a\n    destination: {type: lightdb-stream, version: v1}\n    retry: {tries: 3}\n",
         "unknown key 'tries' in step 'a' 'retry'", (4, 13)),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, needle: str, position: tuple[int, int]) -> None:
    _, result = load(tmp_path, text)
    assert at(one(result.problems, needle)) == position


def test_unknown_type_suggests_the_closest_name(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: a
            transformer:
              type: json-pach
              parameters: {patch: "[]"}
          - name: b
            destination: {type: webhok, parameters: {url: "https://example.org"}}
          - name: c
            transformer: {type: lightdb-state}
        """)
    problem = one(result.problems, "unknown transformer type 'json-pach'")
    assert problem.message.endswith("did you mean 'json-patch'?")
    assert at(problem) == (4, 13)
    assert (problem.pipeline, problem.step) == ("p", "a")
    assert at(one(result.problems, "unknown destination type 'webhok'; did you mean 'webhook'?")) == (7, 25)
    # a destination put under transformer: says so
    assert at(one(result.problems, "'lightdb-state' is a destination")) == (9, 25)
    assert len(result.problems) == 3


def test_recognised_but_unsupported_types(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: a
            transformer: {type: location}
          - name: b
            destination: {type: aws-s3, version: v1}
        """)
    assert at(one(result.problems, "transformer type 'location' is not supported yet")) == (3, 25)
    assert at(one(result.problems, "destination type 'aws-s3' is not supported yet")) == (5, 25)


def test_bad_version_selectors(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: a
            transformer: {type: data-url, version: "1.0"}
          - name: b
            transformer: {type: data-url, version: v2}
          - name: c
            transformer: {type: data-url, version: 1}
        """)
    assert at(one(result.problems, "version '1.0' is not of the form v1, v1.0 or v1.0.0")) == (3, 44)
    assert at(one(result.problems, "'data-url' has no version v2 (known: v1.0.0)")) == (5, 44)
    assert at(one(result.problems, "version '1' is not of the form")) == (7, 44)


def test_parameter_problems_point_at_the_parameter(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: missing
            transformer:
              type: change-content-type
              parameters:
                typo: image/png
          - name: wrongtype
            transformer:
              type: base64
              parameters:
                decode: [1]
          - name: nested
            transformer:
              type: struct-to-json
              parameters:
                members:
                  - {name: a, type: u8}
                  - {name: b, type: u128}
          - name: noparams
            transformer: {type: data-url, parameters: {key: x}}
          - name: nokey
            transformer: {type: embed-in-json}
          - name: patch
            transformer:
              type: json-patch
              parameters:
                patch: '{"op": "add"}'
          - name: notamapping
            transformer: {type: embed-in-json, parameters: [key]}
        """)
    problems = result.problems
    assert at(one(problems, "'change-content-type' is missing required parameter 'content_type'")) == (5, 7)
    assert at(one(problems, "'change-content-type' has no parameter 'typo' (parameters: content_type)")
              ) == (6, 9)
    assert at(one(problems, "'base64' parameter 'decode': Input should be a valid boolean")) == (11, 17)
    assert at(one(problems, "parameter 'members[1].type': ")) == (18, 29)
    assert at(one(problems, "'data-url' has no parameter 'key' (it takes no parameters)")) == (20, 48)
    assert at(one(problems, "'embed-in-json' is missing required parameter 'key'")) == (22, 5)
    assert at(one(problems, "'json-patch' parameter 'patch': ")) == (27, 16)
    assert at(one(problems, "'parameters' must be a mapping, not a list")) == (29, 52)
    assert len(problems) == 8
    assert {p.step for p in problems} == {"missing", "wrongtype", "nested", "noparams", "nokey", "patch",
                                          "notamapping"}


def test_step_problems(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: a
            destination: {type: lightdb-stream}
          - name: neither
            timeout: 3
          - name: a
            destination: {type: lightdb-stream}
          - destination: {type: lightdb-stream}
          - name: settings
            destination: {type: lightdb-stream}
            timeout: -1
            rate: fast
            max_in_flight: 2.5
            retry: {max_attempts: 0, max_elapsed: 5}
          - just a string
        """)
    problems = result.problems
    assert at(one(problems, "step 'neither' has neither a 'transformer' nor a 'destination'")) == (4, 5)
    assert at(one(problems, "duplicate step name 'a' in pipeline 'p' (first at line 2)")) == (6, 11)
    assert at(one(problems, "step 4 has no 'name'")) == (8, 5)
    assert at(one(problems, "'timeout' must be a positive number")) == (11, 14)
    assert at(one(problems, "'rate' must be a positive number per second")) == (12, 11)
    assert at(one(problems, "'max_in_flight' must be a whole number")) == (13, 20)
    assert at(one(problems, "'retry' max_attempts: Input should be greater than or equal to 1")) == (14, 27)
    assert at(one(problems, "step 6 must be a mapping, not a string")) == (15, 5)
    assert len(problems) == 8


def test_missing_or_empty_steps(tmp_path: Path) -> None:
    _, result = load(tmp_path, "filter:\n  path: /a\n", name="nosteps.yaml")
    assert at(one(result.problems, "pipeline 'nosteps' has no 'steps'")) == (1, 1)
    _, result = load(tmp_path, "steps: []\n", name="empty.yaml")
    assert at(one(result.problems, "'steps' is an empty list")) == (1, 8)
    _, result = load(tmp_path, "pipelines:\n  a: {enabled: true}\n  b:\n    steps: {}\n", name="many.yaml")
    assert at(one(result.problems, "pipeline 'a' has no 'steps'")) == (2, 6)
    assert at(one(result.problems, "'steps' must be a list of steps, not a mapping")) == (4, 12)


def test_document_level_problems(tmp_path: Path) -> None:
    _, result = load(tmp_path, "version: v2\nsteps:\n  - {name: a, destination: {type: lightdb-stream}}\n")
    assert at(one(result.problems, "unsupported pipeline format version 'v2': only 'v1' exists")) == (1, 10)
    _, result = load(tmp_path, "", name="blank.yaml")
    assert at(one(result.problems, "file is empty")) == (1, 1)
    _, result = load(tmp_path, "- a\n- b\n", name="list.yaml")
    assert at(one(result.problems, "not a list")) == (1, 1)
    _, result = load(tmp_path, "pipelines:\n  p:\n    enabled: maybe\n    steps: [{name: a, destination: "
                               "{type: lightdb-stream}}]\n", name="enabled.yaml")
    assert at(one(result.problems, "'enabled' must be true or false, not a string")) == (3, 14)
    _, result = load(tmp_path, "pipelines:\n", name="nopipes.yaml")
    assert at(one(result.problems, "'pipelines' is empty")) == (1, 11)
    _, result = load(tmp_path, "steps: []\nsteps: []\n", name="dupkey.yaml")
    assert at(one(result.problems, "duplicate key 'steps' in the pipeline document (first at line 1)")
              ) == (2, 1)


def test_filter_problems(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        filter:
          path: "/a*/b"
          content_type: 5
        steps:
          - name: a
            destination: {type: lightdb-stream}
        """)
    # points at the '*' itself
    assert at(one(result.problems, "filter path '/a*/b': '*' may only be the last character")) == (2, 12)
    assert at(one(result.problems, "filter content_type must be a non-empty string, not a number")) == (3, 17)
    _, result = load(tmp_path, "filter: [x]\nsteps:\n  - {name: a, destination: {type: lightdb-stream}}\n",
                     name="f2.yaml")
    assert at(one(result.problems, "'filter' must be a mapping, not a list")) == (1, 9)


def test_missing_secrets_name_pipeline_step_and_parameter(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        pipelines:
          notify:
            steps:
              - name: hook
                destination:
                  type: webhook
                  parameters:
                    url: $HOOK_URL_XYZ
                    headers:
                      Authorization: "Bearer ${MISSING_TOKEN_XYZ}"
                      X-Bad: "${not closed"
        """)
    url = one(result.problems, "secret 'HOOK_URL_XYZ' is not set")
    assert at(url) == (8, 18)
    assert "pipeline 'notify' step 'hook' parameter 'url'" in url.message
    assert (url.pipeline, url.step) == ("notify", "hook")
    header = one(result.problems, "secret 'MISSING_TOKEN_XYZ' is not set")
    assert at(header) == (10, 30)
    assert "parameter 'headers.Authorization'" in header.message
    assert at(one(result.problems, "is not a secret reference")) == (11, 22)
    assert len(result.problems) == 3  # no second complaint from parameter validation
    assert result.pipelines == []


def test_secret_values_never_appear_in_problems(tmp_path: Path) -> None:
    secret_op = "op-from-a-secret-7f3a9c"
    secrets = SecretSource({"PATCH_OP": secret_op})
    _, result = load(tmp_path, """\
        steps:
          - name: patch
            transformer:
              type: json-patch
              parameters:
                patch: '[{"op": "${PATCH_OP}", "path": "/a", "value": 1}]'
        """, secrets=secrets)
    problem = one(result.problems, "'json-patch' parameter 'patch'")
    assert at(problem) == (6, 16)
    # the component's own error may echo the (substituted) op: it must not come out
    assert secret_op not in problem.message
    assert secrets_module.redact(f"x {secret_op} y") == "x *** y"


def test_every_problem_message_passes_through_redaction(tmp_path: Path) -> None:
    from pipelines.config import Position, _FileContext

    source = SecretSource({"K": "only-this-source-knows-1234"})
    source.resolve("$K")
    problems: list[Problem] = []
    ctx = _FileContext("f.yaml", problems, source)
    ctx.add(Position("f.yaml", 2, 3), "validator said: only-this-source-knows-1234 is wrong")
    assert str(problems[0]) == "f.yaml:2:3: validator said: *** is wrong"


def test_duplicate_pipeline_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("pipelines:\n  shared:\n    steps: [{name: s, destination: "
                                     "{type: lightdb-stream}}]\n")
    step = "[{name: s, destination: {type: lightdb-stream}}]"
    (tmp_path / "b.yaml").write_text(
        f"pipelines:\n  other:\n    steps: {step}\n  shared:\n    steps: {step}\n")
    (tmp_path / "shared.yaml").write_text("steps: [{name: s, destination: {type: lightdb-stream}}]\n")
    result = load_pipelines([tmp_path])
    dups = [p for p in result.problems if "duplicate pipeline name 'shared'" in p.message]
    assert [(p.position.file, *at(p)) for p in dups] == [
        (str(tmp_path / "b.yaml"), 4, 3), (str(tmp_path / "shared.yaml"), 1, 1)]
    assert f"first defined at {tmp_path / 'a.yaml'}:2:3" in dups[0].message
    assert [p.name for p in result.pipelines] == ["shared", "other"]


def test_all_problems_of_all_files_are_collected(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("steps:\n  - {name: a, transformer: {type: nope}}\n"
                                       "  - {name: b, transformer: {type: nada}}\n")
    (tmp_path / "two.yml").write_text("steps: [\n")
    (tmp_path / "three.yaml").write_text("steps:\n  - {name: c, destination: {type: lightdb-stream}}\n")
    result = load_pipelines([tmp_path, tmp_path / "missing.yaml"])
    files = [Path(p.position.file).name for p in result.problems]
    assert files == ["one.yaml", "one.yaml", "two.yml", "missing.yaml"]
    assert [p.name for p in result.pipelines] == ["three"]
    assert "no such file or directory" in result.problems[-1].message

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    result = load_pipelines([empty_dir])
    assert "no *.yml or *.yaml" in one(result.problems, "directory").message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"steps: [\xff]\n")
    result = load_pipelines([path])
    assert at(one(result.problems, "not UTF-8 text")) == (1, 1)


def test_alias_bombs_and_self_reference_are_refused(tmp_path: Path) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        bomb.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 8)}]")
    bomb.append("steps: *h")
    _, result = load(tmp_path, "\n".join(bomb) + "\n", name="bomb.yaml")
    assert at(one(result.problems, "expands to too many nodes")) == (1, 1)
    _, result = load(tmp_path, "steps: &s [*s]\n", name="self.yaml")
    assert at(one(result.problems, "refers to itself")) == (1, 1)


def test_odd_tags_and_scalars_do_not_crash(tmp_path: Path) -> None:
    _, result = load(tmp_path, """\
        steps:
          - name: !custom odd
            transformer: {type: embed-in-json, parameters: {key: !!binary aGVsbG8=}}
          - name: 2024-13-45
            transformer:
              type: change-content-type
              parameters: {content_type: !!python/name:os.system image/png}
        """)
    # the text as written is used; nothing is executed, nothing raises
    assert result.problems == []
    assert [s.name for s in result.pipelines[0].steps] == ["odd", "2024-13-45"]
    assert result.pipelines[0].steps[1].transformer.params.content_type == "image/png"


def test_allow_missing_secrets_checks_everything_else(tmp_path: Path) -> None:
    secrets = SecretSource({})
    secrets.allow_missing = True
    _, result = load(tmp_path, """\
        steps:
          - name: hook
            destination:
              type: webhook
              parameters: {url: $UNSET_URL_SECRET, headers: {A: "${UNSET_HEADER}"}}
          - name: bad
            destination:
              type: webhook
              parameters: {url: $UNSET_URL_SECRET, headers: [x]}
        """, secrets=secrets)
    # the unset url would fail the URL check: skipped, not reported; the bad headers are
    assert [(at(p), p.step) for p in result.problems] == [((9, 53), "bad")]
    assert "'headers'" in result.problems[0].message
