"""Test helpers for users of engage-async: an in-process Engage simulator.

`FakeEngage` serves Engage's contact endpoints from memory on loopback, records every request
(`RecordedRequest`) and misbehaves on demand (`Fault`, made by `FakeEngage.inject`).
"""

from ._fake import FakeEngage
from ._fake_traffic import Fault, RecordedRequest

__all__ = ["FakeEngage", "Fault", "RecordedRequest"]
