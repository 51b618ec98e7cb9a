"""A live endpoint as a victim: ``RemoteVictim(url, key)`` is a ``Deployable`` whose answers come over HTTP, so the
one Oracle (and its budget accounting) sits in front of it unchanged."""

import numpy as np

from toolkit.artifacts import Deployable
from toolkit.errors import UserError


class RemoteVictim(Deployable):
    def __init__(self, url, key=None, chunk=256, timeout=60.0):
        import httpx

        url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        try:
            response = self._http.get("/v1/card")
        except httpx.HTTPError as exc:
            raise UserError(f"{url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise UserError(f"{url}/v1/card: HTTP {response.status_code} {response.text[:200]}")
        public = response.json()
        super().__init__({"kind": "remote", "name": public["name"], "dataset": public["dataset"]}, url)
        self.url, self.output = url, public["output"]
        self.chunk = min(chunk, public.get("max_rows") or chunk)

    def _proba(self, x):
        """Probabilities from the server for float pixels x (one-hot rows when it answers labels only)."""
        import torch

        x = x.cpu().numpy().astype(np.float32)
        outs = []
        for i in range(0, len(x), self.chunk):
            response = self._http.post("/v1/predict", json={"inputs": x[i:i + self.chunk].tolist()})
            if response.status_code != 200:
                try:
                    reason = response.json().get("error", response.text)
                except ValueError:
                    reason = response.text
                raise UserError(f"{self.url}: HTTP {response.status_code}: {reason}")
            body = response.json()
            if "labels" in body:
                outs.append(torch.nn.functional.one_hot(torch.tensor(body["labels"]), self.num_classes).float())
            else:
                outs.append(torch.tensor(body["probabilities"], dtype=torch.float32))
        return torch.cat(outs)
