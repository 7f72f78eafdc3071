"""Serving on Ray Serve: an OpenAI ingress, an engine deployment that owns the scheduler and step loop,
and tensor-parallel worker actors. Entry points: `clusterft.serve.app.build_app(ServeSpec)` and
`clusterft.serve.launch.start_app(spec)` (imported lazily: importing this package starts nothing)."""
