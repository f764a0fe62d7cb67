"""fakekube: an in-process fake of the Kubernetes API server subset hami-bus uses.

No real API server can run on our test machines, so tests and benchmarks run the real
``kubernetes`` client (``kubernetes.aio``) against this HTTP fake on 127.0.0.1.  It keeps
the behaviour our services depend on: a global resourceVersion with optimistic
concurrency (409), Status error bodies, the three PATCH types, the pod ``binding`` and
``status`` subresources, list+watch with resourceVersion, bookmarks and 410 Expired,
label/field selectors, and fault injection.  See ``server.FakeKube``.
"""

from .errors import ApiError
from .patch import JSONPATCH, MERGEPATCH, STRATEGIC, json_patch, merge_patch, strategic_merge_patch
from .server import FakeKube, RequestRecord

__all__ = [
    "JSONPATCH",
    "MERGEPATCH",
    "STRATEGIC",
    "ApiError",
    "FakeKube",
    "RequestRecord",
    "json_patch",
    "merge_patch",
    "strategic_merge_patch",
]
