"""Contract of the lean transport with pynetdicom's private API, and the fallback to the stock server."""

from __future__ import annotations

import importlib

import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

from dicom_io import transport
from dicom_io.transport import (
    PRIVATE_ATTRIBUTES,
    PRIVATE_METHODS,
    LeanAssociationServer,
    NoDelayThreadedAssociationServer,
    lean_transport_problems,
)


def test_every_private_member_used_exists_with_the_expected_signature() -> None:
    assert lean_transport_problems() == []
    assert len(PRIVATE_METHODS) >= 5


def test_every_private_attribute_used_exists_on_live_objects() -> None:
    ae = AE()
    assoc = Association(ae, MODE_ACCEPTOR)
    live = {"ApplicationEntity": ae, "Association": assoc, "DULServiceProvider": assoc.dul}
    classes = {"AssociationSocket": "pynetdicom.transport", "AssociationServer": "pynetdicom.transport"}
    for owner, name in PRIVATE_ATTRIBUTES:
        if owner in live:
            assert hasattr(live[owner], name), (owner, name)
        elif owner in classes:  # set in the constructor
            cls = getattr(importlib.import_module(classes[owner]), owner)
            assert name in cls.__init__.__code__.co_names, (owner, name)
        else:
            assert hasattr(importlib.import_module(owner), name), (owner, name)


def test_another_pynetdicom_release_falls_back_to_the_stock_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.listener import ReusePortStockServer, server_class
    from worker.settings import Settings

    assert server_class(Settings(), reuse_port=False) is LeanAssociationServer
    monkeypatch.setattr(transport.pynetdicom, "__version__", "9.9.9")
    assert "pynetdicom 9.9.9" in lean_transport_problems()[0]
    assert server_class(Settings(), reuse_port=False) is NoDelayThreadedAssociationServer
    assert server_class(Settings(), reuse_port=True) is ReusePortStockServer
    with pytest.raises(RuntimeError, match="listener_server = 'lean'"):
        server_class(Settings(listener_server="lean"), reuse_port=False)


def test_the_stock_server_can_be_chosen() -> None:
    from worker.listener import server_class
    from worker.settings import Settings

    assert server_class(Settings(listener_server="stock"), reuse_port=False) is NoDelayThreadedAssociationServer
