"""Serving on Ray Serve: an OpenAI ingress, an engine deployment that owns the scheduler and step loop,
and tensor-parallel worker actors. Entry points: `clusterft.serve.app.build_app(ServeSpec)` and
`clusterft.serve.commands.serve_command(...)` (imported lazily: importing this package starts nothing)."""
