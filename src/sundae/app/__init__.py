"""The local web app (``sundae serve``): generate and watch the denoising, paint a mask and inpaint,
refine or outpaint (paper §3.4, §3.6; talk slides 9, 20-23). See :mod:`sundae.app.server`."""

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:
    raise ImportError("the web app needs its extra dependencies: pip install 'sundae[app]'") from error

from sundae.app.server import BackgroundServer, create_app, load_pipeline, serve

__all__ = ["BackgroundServer", "create_app", "load_pipeline", "serve"]
