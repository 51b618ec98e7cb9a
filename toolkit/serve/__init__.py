"""Serving a deployable as an ML API (``mtk serve``) and attacking a live one (``RemoteVictim``)."""
