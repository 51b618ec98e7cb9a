"""A live endpoint as a victim: ``RemoteVictim(url, key)`` has ``predict_proba`` and ``input_shape`` like a loaded
deployable, so the one Oracle (and its budget accounting) sits in front of it unchanged."""

import numpy as np

from toolkit.errors import UserError


class RemoteVictim:
    def __init__(self, url, key=None, chunk=256, timeout=60.0):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.chunk = chunk
        try:
            response = self._http.get("/v1/card")
        except httpx.HTTPError as exc:
            raise UserError(f"{self.url}: cannot reach the server ({exc})") from None
        if response.status_code != 200:
            raise UserError(f"{self.url}/v1/card: HTTP {response.status_code} {response.text[:200]}")
        public = response.json()
        self.output = public["output"]
        self.chunk = min(chunk, public.get("max_rows") or chunk)
        self.card = {"kind": "remote", "name": public["name"], "dataset": public["dataset"]}

    @property
    def input_shape(self):
        return tuple(self.card["dataset"]["input_shape"])

    @property
    def num_classes(self):
        return int(self.card["dataset"]["num_classes"])

    def predict_proba(self, x):
        """Probabilities from the server (one-hot rows when it answers labels only)."""
        import torch

        raw = x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        x = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
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
