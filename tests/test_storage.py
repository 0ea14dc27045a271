import pytest

from raydefense.errors import StorageError
from raydefense.storage import Storage, boto3_client


def _exercise(st: Storage):
    st.check_writable()
    st.write_json("a/b.json", {"x": 1, "t": (1, 2)})
    assert st.read_json("a/b.json") == {"x": 1, "t": [1, 2]}
    assert st.exists("a/b.json") and not st.exists("a/none.json")
    assert st.listdir("a") == ["b.json"]
    import torch

    st.save_torch("m/w.pt", {"w": torch.arange(3.0)})
    assert torch.equal(st.load_torch("m/w.pt")["w"], torch.arange(3.0))
    st.delete_dir("a")
    assert not st.exists("a/b.json")
    with pytest.raises(StorageError, match="not found"):
        st.read_bytes("a/b.json")


def test_local_storage(tmp_path):
    st = Storage.open(str(tmp_path / "root"))
    _exercise(st)
    # Atomic writes leave no temporary files behind.
    st.write_text("x.txt", "hello")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["m", "x.txt"]


def test_s3_storage_against_moto_server(s3_server, s3_bucket):
    st = Storage.open(f"s3://{s3_bucket}/prefix", endpoint_url=s3_server)
    _exercise(st)
    st.write_text("hello.txt", "hi")
    keys = [o["Key"] for o in boto3_client(endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "prefix/hello.txt" in keys


def test_storage_survives_pickling(s3_server, s3_bucket):
    import pickle

    st = Storage.open(f"s3://{s3_bucket}/p", endpoint_url=s3_server).child("run")
    st.write_text("f.txt", "x")
    again = pickle.loads(pickle.dumps(st))
    assert again.read_text("f.txt") == "x"


def test_unreachable_endpoint_is_one_line_error():
    st = Storage.open("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageError) as info:
        st.check_writable()
    assert "s3://bucket/prefix" in str(info.value) and "\n" not in str(info.value)


def test_missing_bucket_is_an_error(s3_server):
    st = Storage.open("s3://no-such-bucket-xyz/p", endpoint_url=s3_server)
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        st.check_writable()


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="gs://"):
        Storage.open("gs://bucket/x")
