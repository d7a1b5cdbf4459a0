"""ECG data layer: PTB-XL loading and checks, writing PTB-XL's layout, the synthetic
generator, FT splits, batches."""

import ast
import csv
import dataclasses
import os
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.data import ecg

with warnings.catch_warnings():
    # wfdb 4.3.1 calls pandas with arguments that pandas 3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    import wfdb

pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:wfdb\..*")

# A miniature PTB-XL: (ecg_id, strat_fold, scp_codes, expected superclasses).
_RECORDS = (
    (1, 1, "{'NORM': 100.0, 'SR': 0.0}", {"NORM"}),
    (2, 3, "{'IMI': 35.0, 'ISC_': 50.0, 'SR': 0.0}", {"MI", "STTC"}),
    (3, 9, "{'LVH': 100.0, 'CLBBB': 100.0}", {"HYP", "CD"}),
    (4, 5, "{'LVOLT': 100.0, 'SR': 0.0}", set()),  # form + rhythm only: no label
    (5, 10, "{'NDT': 100.0, 'XYZ': 10.0}", {"STTC"}),  # XYZ: not in scp_statements
    (6, 10, "{'NORM': 80.0}", {"NORM"}),
)
_STATEMENTS = (  # code, diagnostic, diagnostic_class
    ("NORM", "1.0", "NORM"),
    ("IMI", "1.0", "MI"),
    ("ISC_", "1.0", "STTC"),
    ("NDT", "1.0", "STTC"),
    ("LVH", "1.0", "HYP"),
    ("CLBBB", "1.0", "CD"),
    ("SR", "", ""),
    ("LVOLT", "", ""),
)


def _filename(ecg_id):
    return f"records100/00000/{ecg_id:05d}_lr"


def _write_record(root, ecg_id, signal, fs=100):
    path = os.path.join(root, _filename(ecg_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n_sig = signal.shape[1]
    wfdb.wrsamp(
        os.path.basename(path),
        fs=fs,
        units=["mV"] * n_sig,
        sig_name=list(ecg.LEADS[:n_sig]),
        p_signal=signal,
        fmt=["16"] * n_sig,
        adc_gain=[1000.0] * n_sig,
        baseline=[0] * n_sig,
        write_dir=os.path.dirname(path),
    )


def _write_ptbxl(root):
    """Writes the miniature PTB-XL to root; returns the raw signals [6, 1000, 12] (mV)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(7)
    # Lead-specific offsets and scales, rounded to the 1 uV resolution of the files.
    raw = rng.normal(0.0, 1.0, (len(_RECORDS), 1000, 12)) * np.linspace(0.2, 1.5, 12)
    raw = np.round(raw + np.linspace(-0.5, 0.6, 12), 3)
    with open(os.path.join(root, ecg.PTBXL_DATABASE_CSV), "w") as f:
        f.write("ecg_id,patient_id,scp_codes,strat_fold,filename_lr,filename_hr\n")
        for i, (ecg_id, fold, codes, _) in enumerate(_RECORDS):
            hr = _filename(ecg_id).replace("100", "500").replace("_lr", "_hr")
            f.write(f'{ecg_id},{100 + i}.0,"{codes}",{fold},{_filename(ecg_id)},{hr}\n')
            _write_record(root, ecg_id, raw[i])
    with open(os.path.join(root, ecg.SCP_STATEMENTS_CSV), "w") as f:
        f.write(",description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass\n")
        for code, diagnostic, cls in _STATEMENTS:
            f.write(f"{code},{code.lower()},{diagnostic},,,{cls},\n")
    return raw.astype(np.float32)


@pytest.fixture(scope="module")
def ptbxl(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ptbxl"))
    raw = _write_ptbxl(root)
    return root, raw, ecg.load_ptbxl(root)


@pytest.fixture
def ptbxl_copy(ptbxl, tmp_path):
    root = str(tmp_path / "ptbxl")
    shutil.copytree(ptbxl[0], root)
    return root


# --- load_ptbxl ------------------------------------------------------------------------------


def test_ptbxl_shapes_padding_and_metadata(ptbxl):
    _, _, d = ptbxl
    assert d.source == "ptbxl" and d.fs == 100 and d.num_samples == 1000
    assert d.signals.shape == (6, 1024, 12) and d.signals.dtype == np.float32
    assert d.labels.shape == (6, 5) and d.labels.dtype == np.float32
    np.testing.assert_array_equal(d.signals[:, 1000:], 0.0)
    np.testing.assert_array_equal(d.record_ids, [1, 2, 3, 4, 5, 6])
    assert len(d) == 6 and "PTB-XL, 6 records" in d.description


def test_ptbxl_labels_from_diagnostic_scp_codes_only(ptbxl):
    _, _, d = ptbxl
    for row, (_, _, _, expected) in zip(d.labels, _RECORDS, strict=True):
        assert {c for c, v in zip(ecg.SUPERCLASSES, row, strict=True) if v == 1.0} == expected
    assert set(np.unique(d.labels)) <= {0.0, 1.0}


def test_ptbxl_fold_10_is_the_test_set(ptbxl):
    _, _, d = ptbxl
    np.testing.assert_array_equal(d.fold, [r[1] for r in _RECORDS])
    np.testing.assert_array_equal(d.test_indices, [4, 5])
    np.testing.assert_array_equal(d.pt_indices, [0, 1, 2, 3])


def test_ptbxl_z_scores_every_record_with_non_test_statistics(ptbxl):
    _, raw, d = ptbxl
    train = raw[:4].reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(d.mean, train.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.std, train.std(0), rtol=1e-5)
    expected = (raw - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(d.signals[:, :1000], expected, rtol=1e-4, atol=1e-4)
    pt = d.signals[:4, :1000].reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(pt.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(pt.std(0), 1.0, atol=1e-5)
    # The test records were not part of the statistics.
    assert np.abs(d.signals[4:, :1000].reshape(-1, 12).mean(0)).max() > 1e-3


def test_ptbxl_rejects_a_short_length(ptbxl):
    with pytest.raises(ValueError, match=r"length must be at least 1000.*length=999"):
        ecg.load_ptbxl(ptbxl[0], length=999)


@pytest.mark.parametrize("name", [ecg.PTBXL_DATABASE_CSV, ecg.SCP_STATEMENTS_CSV])
def test_ptbxl_missing_csv_is_named(ptbxl_copy, name):
    os.remove(os.path.join(ptbxl_copy, name))
    with pytest.raises(FileNotFoundError, match=name):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_missing_record_is_named(ptbxl_copy):
    os.remove(os.path.join(ptbxl_copy, _filename(3) + ".dat"))
    with pytest.raises(FileNotFoundError, match=r"00003_lr\.dat \(ecg_id=3"):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_record_at_500_hz_is_named(ptbxl_copy):
    _write_record(ptbxl_copy, 2, np.zeros((1000, 12)), fs=500)
    with pytest.raises(ValueError, match=r"00002_lr \(ecg_id=2\) must be sampled at 100 Hz.*500"):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_record_with_11_leads_is_named(ptbxl_copy):
    _write_record(ptbxl_copy, 4, np.zeros((1000, 11)))
    with pytest.raises(ValueError, match=r"00004_lr \(ecg_id=4\) must have 12 leads.*11"):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_record_with_a_missing_lead_name_is_named(ptbxl_copy):
    path = os.path.join(ptbxl_copy, _filename(2))
    _write_record(ptbxl_copy, 2, np.zeros((1000, 12)))
    header = open(path + ".hea").read().replace(" V6", " V5")  # 12 signals, V6 missing
    with open(path + ".hea", "w") as f:
        f.write(header)
    with pytest.raises(
        ValueError, match=r"00002_lr \(ecg_id=2\) must hold the leads.*missing: \['V6'\]"
    ):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_record_with_wrong_length_is_named(ptbxl_copy):
    _write_record(ptbxl_copy, 5, np.zeros((900, 12)))
    with pytest.raises(ValueError, match=r"00005_lr \(ecg_id=5\) must have 1000 samples.*900"):
        ecg.load_ptbxl(ptbxl_copy)


def test_ptbxl_missing_column_is_named(ptbxl_copy):
    path = os.path.join(ptbxl_copy, ecg.PTBXL_DATABASE_CSV)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("strat_fold", "fold", 1))
    with pytest.raises(
        ValueError, match=r"ptbxl_database\.csv lacks the column\(s\) \['strat_fold'"
    ):
        ecg.load_ptbxl(ptbxl_copy)


# --- write_ptbxl_layout ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """30 synthetic records, the first without a label, written in PTB-XL's layout and read back."""
    d = ecg.make_synthetic_ecg(30, seed=4)
    labels = d.labels.copy()
    labels[0] = 0.0
    d = dataclasses.replace(d, labels=labels)
    root = str(tmp_path_factory.mktemp("written") / "ptbxl")  # the writer creates it
    ecg.write_ptbxl_layout(d, root)
    return root, d, ecg.load_ptbxl(root)


def test_written_layout_reads_back_labels_folds_and_signals(written):
    _, d, back = written
    assert back.source == "ptbxl" and "PTB-XL, 30 records" in back.description
    np.testing.assert_array_equal(back.labels, d.labels)
    np.testing.assert_array_equal(back.labels[0], 0.0)
    np.testing.assert_array_equal(back.fold, d.fold)
    np.testing.assert_array_equal(back.record_ids, np.arange(1, 31))
    np.testing.assert_array_equal(back.signals[:, 1000:], 0.0)
    # In mV the files hold the raw signals rounded to 1 uV: at most 0.5 uV off, plus the
    # float32 error of the z-scored signals (well under 0.01 uV at these amplitudes).
    raw = d.signals[:, :1000].astype(np.float64) * d.std + d.mean
    raw_back = back.signals[:, :1000].astype(np.float64) * back.std + back.mean
    assert np.abs(raw_back - raw).max() <= 0.5e-3 + 1e-5
    # In z-scored units: load_ptbxl recomputes the statistics from the rounded samples. A
    # rounding error e (|e| <= 0.5 uV a sample) moves each lead's mean by at most 0.5 uV and
    # its std by at most 0.5 uV (the std is a norm of the centred samples), so
    # z = (x - mean) / std moves by at most (0.5 + 0.5 + 0.5 |z|) uV / std; 1e-5 for float32.
    np.testing.assert_allclose(back.mean, d.mean, rtol=0, atol=0.5e-3 + 1e-6)
    np.testing.assert_allclose(back.std, d.std, rtol=0, atol=0.5e-3 + 1e-6)
    z = d.signals[:, :1000]
    tolerance = (1e-3 + 0.5e-3 * np.abs(z)) / back.std + 1e-5
    assert np.all(np.abs(back.signals[:, :1000] - z) <= tolerance)


def test_written_files_follow_ptbxl(written):
    root, d, _ = written
    with open(os.path.join(root, ecg.PTBXL_DATABASE_CSV), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == "ecg_id patient_id scp_codes strat_fold filename_lr filename_hr".split()
    assert [r["ecg_id"] for r in rows] == [str(i) for i in range(1, 31)]
    assert rows[0]["scp_codes"] == "{'SR': 0.0}"  # no label: the rhythm statement only
    assert rows[1]["filename_lr"] == "records100/00000/00002_lr"
    assert rows[1]["filename_hr"] == "records500/00000/00002_hr"
    assert ecg._ptbxl_filename(1234, 100) == "records100/01000/01234_lr"
    for row, label in zip(rows[1:], d.labels[1:], strict=True):
        codes = ast.literal_eval(row["scp_codes"])
        superclasses = [c for c, v in zip(ecg.SUPERCLASSES, label, strict=True) if v]
        expected = {ecg.PTBXL_CODE_FOR_SUPERCLASS[c]: 100.0 for c in superclasses}
        assert codes == {**expected, "SR": 0.0}
    with open(os.path.join(root, ecg.SCP_STATEMENTS_CSV), newline="") as f:
        statements = {r[""]: r for r in csv.DictReader(f)}
    assert statements["IMI"]["diagnostic_class"] == "MI" and statements["SR"]["rhythm"] == "1.0"
    header = wfdb.rdheader(os.path.join(root, rows[1]["filename_lr"]))
    assert (header.fs, header.sig_len, header.sig_name) == (100, 1000, list(ecg.LEADS))
    assert header.units == ["mV"] * 12 and header.fmt == ["16"] * 12
    assert header.adc_gain == [1000.0] * 12 and header.baseline == [0] * 12


@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"fs": 250, "length": 2560}, "fs=250, num_samples=2500"),
        ({"duration_s": 5.0}, "fs=100, num_samples=500"),
    ],
)
def test_write_refuses_records_ptbxl_cannot_hold(tmp_path, kwargs, received):
    d = ecg.make_synthetic_ecg(2, seed=0, **kwargs)
    with pytest.raises(
        ValueError, match=r"10 s records at 100 Hz \(1000 samples\)\. Received: " + received
    ):
        ecg.write_ptbxl_layout(d, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_write_refuses_samples_outside_16_bits_at_1_uv(tmp_path):
    d = ecg.make_synthetic_ecg(2, seed=0)
    d = dataclasses.replace(d, mean=d.mean + np.float32(40.0))  # every sample near 40 mV
    received = r"Received: [\d.]+ mV in record 0 \(ecg_id 1\), lead I, sample 0"
    with pytest.raises(ValueError, match=r"at most 32\.767 mV .*" + received):
        ecg.write_ptbxl_layout(d, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    root = str(tmp_path)
    ecg.write_ptbxl_layout(ecg.make_synthetic_ecg(3, seed=0), root)
    other = ecg.make_synthetic_ecg(2, seed=1)
    with pytest.raises(
        FileExistsError, match=r"ptbxl_database\.csv already exists; pass overwrite=True"
    ):
        ecg.write_ptbxl_layout(other, root)
    assert len(ecg.load_ptbxl(root)) == 3
    ecg.write_ptbxl_layout(other, root, overwrite=True)
    back = ecg.load_ptbxl(root)
    np.testing.assert_array_equal(back.labels, other.labels)
    np.testing.assert_array_equal(back.fold, other.fold)


# --- make_synthetic_ecg ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    return ecg.make_synthetic_ecg(1500, seed=3)


def test_synthetic_shapes_padding_and_folds(synthetic):
    d = synthetic
    assert d.source == "synthetic" and d.fs == 100 and d.num_samples == 1000
    assert d.signals.shape == (1500, 1024, 12) and d.signals.dtype == np.float32
    assert d.labels.shape == (1500, 5) and d.labels.dtype == np.float32
    np.testing.assert_array_equal(d.signals[:, 1000:], 0.0)
    np.testing.assert_array_equal(np.bincount(d.fold), [0] + [150] * 10)
    pt = d.signals[d.pt_indices, :1000].reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(pt.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(pt.std(0), 1.0, atol=1e-4)
    hr = d.metadata["heart_rate_bpm"]
    assert hr.min() >= 50 and hr.max() <= 110


def test_synthetic_is_deterministic_in_seed():
    a = ecg.make_synthetic_ecg(40, seed=11)
    b = ecg.make_synthetic_ecg(40, seed=11)
    c = ecg.make_synthetic_ecg(40, seed=12)
    np.testing.assert_array_equal(a.signals, b.signals)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.fold, b.fold)
    assert not np.array_equal(a.signals, c.signals)


def test_synthetic_prevalence_and_norm_means_none_of_the_others(synthetic):
    labels = synthetic.labels
    prevalence = labels.mean(0)
    assert np.all((prevalence > 0.1) & (prevalence < 0.42)), prevalence
    np.testing.assert_array_equal(labels[:, 0], labels[:, 1:].sum(1) == 0)


def _around_r(d, offsets_s):
    """Raw signal (mV) at R + offset, averaged over the beats of each record: [N, K, 12]."""
    raw = d.signals[:, : d.num_samples] * d.std + d.mean
    r = d.metadata["r_peak_s"][:, :, None] + np.asarray(offsets_s)[None, None, :]  # [N, B, K]
    idx = np.round(r * d.fs)
    ok = np.isfinite(idx) & (idx >= 0) & (idx < d.num_samples)
    ok &= ok.all(axis=2, keepdims=True)  # whole window inside the record
    idx = np.where(ok, idx, 0).astype(np.int64)
    n, b, k = idx.shape
    values = np.take_along_axis(raw, idx.reshape(n, b * k, 1), axis=1).reshape(n, b, k, 12)
    return (values * ok[..., None]).sum(1) / ok.sum(1)[..., None]


def _in_and_out(d, name, stat):
    on = d.labels[:, ecg.SUPERCLASSES.index(name)] > 0
    return stat[on], stat[~on]


def test_synthetic_mi_raises_the_st_segment(synthetic):
    w = _around_r(synthetic, [-0.07, 0.1])  # PR segment, ST segment
    st = (w[:, 1] - w[:, 0]).max(axis=1)  # highest ST level over the leads
    on, off = _in_and_out(synthetic, "MI", st)
    assert on.mean() > off.mean() + 0.12
    assert np.median(on) > np.quantile(off, 0.9)


def test_synthetic_sttc_inverts_the_t_wave(synthetic):
    offsets = np.arange(0.18, 0.33, 0.01)
    w = _around_r(synthetic, [-0.07, *offsets])
    lateral = [0, 10, 11]  # I, V5, V6
    t_level = (w[:, 1:, lateral] - w[:, :1, lateral]).mean(axis=(1, 2))
    on, off = _in_and_out(synthetic, "STTC", t_level)
    assert on.mean() < 0 < off.mean()
    assert np.median(on) < np.quantile(off, 0.1)


def test_synthetic_cd_widens_the_qrs(synthetic):
    offsets = np.arange(-0.1, 0.105, 0.01)
    w = _around_r(synthetic, [-0.07, *offsets])
    energy = np.square(w[:, 1:] - w[:, :1]).sum(axis=2)  # [N, K] over leads
    width = np.sqrt((energy * offsets**2).sum(1) / energy.sum(1))
    on, off = _in_and_out(synthetic, "CD", width)
    assert on.mean() > 1.4 * off.mean()
    assert np.median(on) > np.quantile(off, 0.9)


def test_synthetic_hyp_enlarges_the_qrs(synthetic):
    w = _around_r(synthetic, np.arange(-0.08, 0.085, 0.01))
    peak_to_peak = (w.max(axis=1) - w.min(axis=1)).sum(axis=1)  # summed over leads
    on, off = _in_and_out(synthetic, "HYP", peak_to_peak)
    assert on.mean() > 1.5 * off.mean()
    assert np.median(on) > np.quantile(off, 0.85)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"num_records must be at least 1.*num_records=0"):
        ecg.make_synthetic_ecg(0, seed=0)
    with pytest.raises(ValueError, match=r"length must be at least 1000.*length=512"):
        ecg.make_synthetic_ecg(2, length=512, seed=0)


# --- ft_split --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, sizes", [(10, (5, 5)), (25, (15, 10)), (50, (40, 10)), (100, (80, 20)), (500, (400, 100))]
)
def test_ft_split_sizes(synthetic, n, sizes):
    pool = synthetic.labels[synthetic.pt_indices]
    train, val = ecg.ft_split(pool, n, seed=0)
    assert (train.size, val.size) == sizes
    assert not set(train) & set(val)
    assert train.min() >= 0 and max(train.max(), val.max()) < pool.shape[0]
    assert train.dtype == np.int64 and np.all(np.diff(train) > 0)
    again = ecg.ft_split(pool, n, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    other = ecg.ft_split(pool, n, seed=1)
    assert not np.array_equal(train, other[0])


def test_ft_split_other_n_and_errors():
    labels = np.eye(5, dtype=np.float32)[np.arange(40) % 5]
    assert ecg.ft_sizes(2) == (1, 1) and ecg.ft_sizes(33) == (26, 7)
    with pytest.raises(ValueError, match=r"n must be at most 40.*n=41"):
        ecg.ft_split(labels, 41, seed=0)
    with pytest.raises(ValueError, match=r"n must be at least 2.*n=1"):
        ecg.ft_split(labels, 1, seed=0)


# --- make_dataset ----------------------------------------------------------------------------


def test_make_dataset_batches_signal_label_index_and_resumes():
    d = ecg.make_synthetic_ecg(12, seed=5)
    ds = ecg.make_dataset(d.signals, d.labels, batch_size=4, seed=2)
    it = iter(ds)
    first = next(it)
    assert set(first) == {"signal", "label", "index"}
    assert first["signal"].shape == (4, 1024, 12) and first["label"].shape == (4, 5)
    np.testing.assert_array_equal(first["signal"], d.signals[first["index"].numpy()])
    ckpt = tf.train.Checkpoint(iterator=it)
    path = ckpt.write(os.path.join(tf.compat.v1.test.get_temp_dir(), "ecg_it"))
    expected = [next(it)["index"].numpy() for _ in range(4)]
    ckpt.read(path).assert_consumed()
    np.testing.assert_array_equal([next(it)["index"].numpy() for _ in range(4)], expected)
    with pytest.raises(ValueError, match=r"labels must be \[N, 5\] .* with N=12"):
        ecg.make_dataset(d.signals, d.labels[:5], batch_size=4, seed=2)


def test_make_dataset_names_wrong_lead_and_label_widths():
    d = ecg.make_synthetic_ecg(12, seed=5)
    with pytest.raises(
        ValueError, match=r"signals must be \[N, length, 12\].*shape=\(12, 1024, 11\)"
    ):
        ecg.make_dataset(d.signals[..., :11], d.labels, batch_size=4, seed=2)
    with pytest.raises(ValueError, match=r"labels must be \[N, 5\].*shape=\(12, 4\)"):
        ecg.make_dataset(d.signals, d.labels[:, :4], batch_size=4, seed=2)
