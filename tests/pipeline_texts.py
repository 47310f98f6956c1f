"""Pipeline files that several test modules write (YAML text for ``--pipelines``).

    from pipeline_texts import KEEP_READINGS, RPC_RESULTS
    (tmp_path / "p.yaml").write_text(RPC_RESULTS)
"""

# devices' RPC answers (``/.rpc/result``) kept in the stream
RPC_RESULTS = """\
pipelines:
  rpc-results:
    filter: {path: /.rpc/result}
    steps:
      - name: keep
        destination: {type: lightdb-stream, version: v1}
"""

# ``/readings`` kept in the stream (more pipelines may be appended to the text)
KEEP_READINGS = """
pipelines:
  keep:
    filter: {path: /readings}
    steps:
      - name: stream
        destination: {type: lightdb-stream, version: v1}
"""
