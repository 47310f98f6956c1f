"""Loading pipeline files that are right: the Golioth form, the several-pipelines form,
directories, step settings, and what the engine receives."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pipelines.config import ComponentRef, PipelineConfig, load_pipelines
from pipelines.retry import RetryPolicy
from pipelines.secrets import SecretSource

# golioth/docs docs/data-routing/5-examples/18-replicate.md, decoded, verbatim
GOLIOTH_REPLICATE = """\
filter:
  path: "/images"
steps:
  - name: png
    transformer: {type: change-content-type, version: v1, parameters: {content_type: image/png}}
  - name: url
    transformer: {type: data-url, version: v1}
  - name: embed
    transformer: {type: embed-in-json, version: v1, parameters: {key: image}}
  - name: create-payload
    transformer:
      type: json-patch
      version: v1
      parameters:
        patch: |
          [
            {"op": "add", "path": "/version", "value": "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"},
            {"op": "add", "path": "/input", "value": {"image": ""}},
            {"op": "move", "from": "/image", "path": "/input/image"}
          ]
  - name: predict
    destination:
      type: webhook
      version: v1
      parameters:
        url: https://api.replicate.com/v1/predictions
        headers:
          Authorization: $REPLICATE_TOKEN     # secret value = "Bearer <token>"
"""  # noqa: E501 - verbatim


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_golioth_document_copied_verbatim_loads_clean(tmp_path: Path) -> None:
    path = write(tmp_path, "replicate-caption.yaml", GOLIOTH_REPLICATE)
    secrets = SecretSource({"replicate_token": "Bearer r8_loading_test_token"})
    result = load_pipelines([path], secrets)
    assert result.problems == []
    assert result.ok
    [pipeline] = result.pipelines
    assert isinstance(pipeline, PipelineConfig)
    assert pipeline.name == "replicate-caption"  # the file's stem
    assert pipeline.enabled is True
    assert pipeline.source == str(path)
    assert (pipeline.position.line, pipeline.position.col) == (1, 1)
    assert pipeline.filter.path == "/images" and pipeline.filter.content_type is None
    assert pipeline.filter.matches("/images/", "application/octet-stream")
    assert [s.name for s in pipeline.steps] == ["png", "url", "embed", "create-payload", "predict"]
    assert [s.position.line for s in pipeline.steps] == [4, 6, 8, 10, 21]

    png = pipeline.steps[0].transformer
    assert isinstance(png, ComponentRef)
    assert (png.kind, png.type, png.version) == ("transformer", "change-content-type", "v1")
    assert png.cls.type == "change-content-type"
    assert png.params.content_type == "image/png"
    assert pipeline.steps[0].destination is None

    predict = pipeline.steps[4]
    assert predict.transformer is None
    assert predict.destination is not None and predict.destination.kind == "destination"
    # the secret is substituted in the validated params, not in what was written
    assert predict.destination.params.headers == {"Authorization": "Bearer r8_loading_test_token"}
    assert predict.destination.raw_params["headers"] == {"Authorization": "$REPLICATE_TOKEN"}
    assert predict.destination.position.line == 22
    assert predict.retry is None and predict.timeout is None and predict.rate is None


def test_several_pipelines_in_one_file_and_step_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "all.yml", """\
        version: v1
        pipelines:
          telemetry:
            filter: {path: "/temp/*", content_type: application/json}
            steps:
              - name: state
                destination: {type: lightdb-state, version: v1.0, parameters: {path: /latest}}
                retry: {max_attempts: 3, max_elapsed: 60, retry_on: [409], drop_on: [503]}
                timeout: 2.5
                max_in_flight: 4
                rate: 120/min
          idle:
            enabled: false
            steps:
              - name: hook
                transformer: {type: data-url}
                destination:
                  type: webhook
                  version: v1.0.0
                  parameters: {url: "https://example.org/hook", headers: {X-Key: "k-${KEY}"}}
                timeout: 500ms
                rate: 5
        """)
    result = load_pipelines([path], SecretSource({"key": "value-of-key"}))
    assert result.problems == []
    telemetry, idle = result.pipelines
    assert (telemetry.name, telemetry.enabled) == ("telemetry", True)
    assert telemetry.position.line == 3
    assert telemetry.filter.matches("/temp/x", "application/json")
    assert not telemetry.filter.matches("/temp", "application/json")
    step = telemetry.steps[0]
    assert isinstance(step.retry, RetryPolicy)
    assert (step.retry.max_attempts, step.retry.max_elapsed) == (3, 60)
    assert step.retry.retry_on == [409] and step.retry.drop_on == [503]
    assert (step.timeout, step.max_in_flight, step.rate) == (2.5, 4, 2.0)
    assert step.destination is not None and step.destination.version == "v1.0"

    assert (idle.name, idle.enabled) == ("idle", False)  # loaded, but idle
    hook = idle.steps[0]
    assert hook.transformer is not None and hook.destination is not None
    assert hook.destination.params.headers == {"X-Key": "k-value-of-key"}
    assert (hook.timeout, hook.rate, hook.max_in_flight) == (0.5, 5.0, None)
    assert idle.filter.matches("/anything", "any/type")  # no filter matches everything


def test_directory_loads_every_yaml_file_in_name_order(tmp_path: Path) -> None:
    step = """\
        steps:
          - name: s
            destination: {type: lightdb-stream}
        """
    write(tmp_path / "dir", "b.yaml", step)
    write(tmp_path / "dir", "a.yml", step)
    write(tmp_path / "dir", "c.yaml", """\
        pipelines:
          c-one: {steps: [{name: s, destination: {type: lightdb-stream}}]}
          c-two: {steps: [{name: s, destination: {type: lightdb-stream}}]}
        """)
    write(tmp_path / "dir", "notes.txt", "not a pipeline: [")
    write(tmp_path / "dir" / "sub", "ignored.yaml", "not: [loaded")
    extra = write(tmp_path, "extra.yaml", step)
    result = load_pipelines([tmp_path / "dir", str(extra)])
    assert result.problems == []
    assert [p.name for p in result.pipelines] == ["a", "b", "c-one", "c-two", "extra"]
    assert result.pipelines[0].source == str(tmp_path / "dir" / "a.yml")


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    path = write(tmp_path, "anchors.yaml", """\
        pipelines:
          one:
            steps:
              - name: hook
                destination: &hook
                  type: webhook
                  parameters: {url: "https://example.org/a", headers: {A: "1"}}
          two:
            steps:
              - name: hook
                destination:
                  <<: *hook
                  version: v1
        """)
    result = load_pipelines([path])
    assert result.problems == []
    assert result.pipelines[1].steps[0].destination.params.url == "https://example.org/a"


def test_version_selectors_and_missing_version_resolve(tmp_path: Path) -> None:
    path = write(tmp_path, "versions.yaml", """\
        steps:
          - {name: a, transformer: {type: change-content-type, parameters: &p {content_type: x/y}}}
          - {name: b, transformer: {type: change-content-type, version: v1, parameters: *p}}
          - {name: c, transformer: {type: change-content-type, version: v1.0, parameters: *p}}
          - {name: d, transformer: {type: change-content-type, version: v1.0.0, parameters: *p}}
        """)
    result = load_pipelines([path])
    assert result.problems == []
    refs = [s.transformer for s in result.pipelines[0].steps]
    assert [r.version for r in refs] == [None, "v1", "v1.0", "v1.0.0"]
    assert len({r.cls for r in refs}) == 1
