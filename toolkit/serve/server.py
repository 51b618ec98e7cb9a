"""Runs the serving app with uvicorn (the ``serve`` extra: fastapi + uvicorn)."""

from toolkit.errors import UserError


def serve(artifact, host="127.0.0.1", port=8000, keys_path=None, threads=1, **options):
    """Serves ``artifact``; ``threads`` torch threads for the model (1: small batches gain nothing from more on a
    few cores, and idle OpenMP workers spinning beside the event loop cost it throughput)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    try:
        import uvicorn
    except ImportError:
        raise UserError("mtk serve needs the serving extra: pip install -e '.[serve]'") from None
    from toolkit.artifacts import load_deployable
    from toolkit.serve.app import create_app
    from toolkit.serve.keys import KeyStore

    keys = KeyStore(keys_path) if keys_path else None
    app = create_app(load_deployable(artifact), keys, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
