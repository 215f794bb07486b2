"""The committed gRPC/protobuf stubs match proto/ and the protobuf runtime that is installed."""

from __future__ import annotations

import re

from google.protobuf import __version__ as runtime_version

from keyward.wire import api_pb2, envelope_pb2, generate


def test_committed_stubs_are_what_the_pinned_generator_makes_from_proto(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "the generator wrote nothing"
    for fresh in written:
        committed = generate.PACKAGE_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run `make protos`"


def test_the_runtime_is_the_same_major_and_not_older_than_the_generated_code():
    source = (generate.PACKAGE_DIR / "api_pb2.py").read_text()
    match = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", source)
    assert match, "generated code carries no version"
    gencode = tuple(int(x) for x in match.groups())
    runtime = tuple(int(x) for x in runtime_version.split(".")[:3])
    assert runtime[0] == gencode[0]
    assert runtime >= gencode


def test_the_service_has_the_method_paths_kube_apiserver_calls():
    service = api_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert api_pb2.DESCRIPTOR.package == "v2"
    assert sorted(m.name for m in service.methods) == ["Decrypt", "Encrypt", "Status"]


def test_the_envelope_message_has_the_field_numbers_of_the_apiserver():
    fields = {f.name: f.number for f in envelope_pb2.EncryptedObject.DESCRIPTOR.fields}
    assert fields == {
        "encryptedData": 1,
        "keyID": 2,
        "encryptedDEKSource": 3,
        "annotations": 4,
        "encryptedDEKSourceType": 5,
    }
