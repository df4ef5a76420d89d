"""One thin adapter per KServe protocol: which images a request carries, and how its answer is shaped.

The classification (predictor.dataplane: decode -> batch -> probabilities) is the same for all of
them; an adapter only reads its protocol's body into image slots and renders the probabilities back
into that protocol's response (the multipart routes call the data plane directly):

- KServe v1 (`:predict`): `{"instances": [...]}` JSON, or an image sent as the whole body;
- KServe v2 (`/infer`, REST and gRPC), JSON or the binary-data extension: base64 images or ready
  32x32 pixels.
"""

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor import payloads
from predictor.core.errors import ApiError
from predictor.dataplane import Slots

# Decodes encoded images off the event loop: (files, keep_errors) -> one image or error per file.
Decoder = Callable[[list[bytes | ApiError], bool], Awaitable[Slots]]


class V1Adapter:
    """KServe v1 `:predict`: a JSON body of base64 instances, or (any non-JSON body) one image."""

    @staticmethod
    async def slots(body: dict | bytes, decode: Decoder, max_images: int) -> Slots:
        if isinstance(body, (bytes, bytearray)):  # sent with a non-JSON content type
            body = bytes(body)
            if not body.lstrip().startswith(b"{"):  # an image body; decode_image sniffs its real format
                return await decode([body], False)
            body = payloads.json_object(body)
        return await decode(payloads.v1_instances(body, max_images), False)

    @staticmethod
    def render(body: dict | bytes, probabilities: Slots, model_name: str, version: str) -> dict:
        return {"predictions": [payloads.classification(p) for p in probabilities]}


class V2Adapter:
    """KServe v2 `/infer`: an `image` BYTES input (base64 in JSON) or a `pixels` UINT8 input."""

    @staticmethod
    async def slots(request: InferRequest, decode: Decoder, max_images: int) -> Slots:
        encoded, pixels = payloads.v2_input(request, max_images)
        return list(pixels) if pixels is not None else await decode(encoded, False)

    @staticmethod
    def render(request: InferRequest, probabilities: Slots, model_name: str, version: str) -> InferResponse:
        request.id = request.id or str(uuid.uuid4())
        return payloads.v2_response(request, model_name, version, np.stack(probabilities))


Adapter = type[V1Adapter] | type[V2Adapter]


def adapter_for(payload: object) -> Adapter:
    """The adapter of the body KServe hands the model."""
    if isinstance(payload, InferRequest):
        return V2Adapter
    return V1Adapter


@dataclass
class Prepared:
    """What preprocess hands predict (and predict hands postprocess): the request, its adapter, one
    decoded image per slot, and then one row of probabilities per slot."""

    adapter: Adapter
    source: object
    slots: Slots
    probabilities: Slots = field(default_factory=list)


def omit_unset_optional_fields() -> None:
    """KServe's v2 REST answers carry `"parameters": null` (top level and per output), which the OIP
    schema forbids (`parameters` is an object when present): serve its InferenceResponse without them.
    Called in every serving process (predictor.app.install); idempotent."""
    from typing import ClassVar

    from kserve.protocol.rest import v2_endpoints
    from pydantic import model_serializer

    if getattr(v2_endpoints.InferenceResponse, "omits_unset", False):
        return

    class InferenceResponse(v2_endpoints.InferenceResponse):
        omits_unset: ClassVar[bool] = True

        @model_serializer(mode="wrap")
        def _without_nulls(self, handler):
            body = {k: v for k, v in handler(self).items() if k != "parameters" or v is not None}
            body["outputs"] = [{k: v for k, v in o.items() if k != "parameters" or v is not None} for o in body["outputs"]]
            return body

    v2_endpoints.InferenceResponse = InferenceResponse
