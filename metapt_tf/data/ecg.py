"""12-lead ECGs for the ECG meta-PT experiment: PTB-XL, a synthetic stand-in, FT splits, batches.

The task is multi-label classification of a 10 s, 12-lead ECG into the five
PTB-XL diagnostic superclasses `SUPERCLASSES` (NORM, MI, STTC, CD, HYP).

* `load_ptbxl` reads the PTB-XL release from disk (the 100 Hz records), maps
  each record's SCP codes to a multi-hot superclass label, keeps the
  stratified fold (fold 10 is the test set, folds 1-9 the pre-training pool)
  and z-scores every lead with statistics of the non-test records.
* `write_ptbxl_layout` writes an `EcgData` back to disk in PTB-XL's layout
  (the two CSVs and one 100 Hz wfdb record per row), so that `load_ptbxl`
  reads it; with synthetic records, the PTB-XL path runs without the download.
* `make_synthetic_ecg` draws ECG-shaped signals (P, QRS and T waves, baseline
  wander, noise) whose five labels are written into the waveform morphology.
  It is the offline default: it needs no download, and a model can learn it.
* `ft_split` cuts the N labelled fine-tuning examples of one regime into
  train/val index sets (N=10: 5/5, N=25: 15/10, N>=50: 80/20).
* `make_dataset` turns signals and labels into a seeded, checkpointable
  `tf.data.Dataset` of {"signal", "label", "index"} batches.

Both sources return an `EcgData` with float32 signals [N, length, 12], zero
padded from 10 s (1000 samples at 100 Hz) to `length` (1024 by default), after
z-scoring, so the padding sits at each lead's mean.

Everything random takes an explicit seed and depends on nothing else (neither
numpy's nor TensorFlow's global seed).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from metapt_tf.data import mnist

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
NUM_CLASSES = len(SUPERCLASSES)
LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)
PTBXL_FS = 100  # Hz, the "records100" / filename_lr version of PTB-XL
PTBXL_NUM_SAMPLES = 1000  # 10 s at 100 Hz
DEFAULT_LENGTH = 1024
TEST_FOLD = 10
NUM_FOLDS = 10

PTBXL_DATABASE_CSV = "ptbxl_database.csv"
SCP_STATEMENTS_CSV = "scp_statements.csv"
_DATABASE_COLUMNS = ("ecg_id", "filename_lr", "scp_codes", "strat_fold")
_STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class")


@dataclasses.dataclass(frozen=True, eq=False)
class EcgData:
    """A set of labelled 12-lead ECGs.

    Attributes:
      signals: float32 [N, length, 12], z-scored per lead (see `mean`, `std`);
        samples [0, num_samples) are the recording, the rest is zero padding.
        Leads in the order of `LEADS`.
      labels: float32 [N, 5], multi-hot over `SUPERCLASSES`. A record may have
        several labels, or none (PTB-XL records without a diagnostic statement).
      fold: int64 [N], the stratified fold 1..10; fold `TEST_FOLD` (10) is the
        test set, folds 1..9 the pre-training pool.
      record_ids: int64 [N], PTB-XL's ecg_id, or 0..N-1 for synthetic records.
      fs: sampling rate in Hz.
      num_samples: samples per record before padding (1000 for PTB-XL).
      mean: float32 [12], per-lead mean subtracted from the raw signals (mV).
      std: float32 [12], per-lead standard deviation they were divided by (mV).
      source: "ptbxl" or "synthetic".
      description: one line for logs and reports.
      metadata: extra per-record arrays; synthetic records carry "r_peak_s"
        (float32 [N, B], R-peak times in seconds, NaN padded) and
        "heart_rate_bpm" (float32 [N]).
    """

    signals: np.ndarray
    labels: np.ndarray
    fold: np.ndarray
    record_ids: np.ndarray
    fs: int
    num_samples: int
    mean: np.ndarray
    std: np.ndarray
    source: str
    description: str
    metadata: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_test(self) -> np.ndarray:
        """bool [N], True for the test fold."""
        return self.fold == TEST_FOLD

    @property
    def test_indices(self) -> np.ndarray:
        """int64 positions of the test records (fold 10)."""
        return np.flatnonzero(self.is_test).astype(np.int64)

    @property
    def pt_indices(self) -> np.ndarray:
        """int64 positions of the pre-training pool (folds 1..9)."""
        return np.flatnonzero(~self.is_test).astype(np.int64)


# --- PTB-XL ----------------------------------------------------------------------------------


def load_ptbxl(root: str, *, length: int = DEFAULT_LENGTH) -> EcgData:
    """Loads the 100 Hz records of PTB-XL with diagnostic-superclass labels.

    Reads `root/ptbxl_database.csv` (columns ecg_id, filename_lr, scp_codes,
    strat_fold) and `root/scp_statements.csv` (indexed by SCP code, with
    columns diagnostic and diagnostic_class), and every record
    `root/<filename_lr>` with `wfdb.rdsamp`. Records keep the order of the
    database CSV.

    Labels: for each code in a record's scp_codes dict (whatever its
    likelihood value), if its scp_statements row has diagnostic == 1, the
    record gets that row's diagnostic_class. Codes that are not diagnostic
    (rhythm or form statements such as "SR") or not in scp_statements are
    ignored; a record with no diagnostic code has an all-zero label.

    Normalisation: one mean and one standard deviation per lead, pooled over
    all samples of all non-test records (folds 1..9), are applied to every
    record, test records included. Padding is added after z-scoring, so it is
    zero in normalised units.

    Args:
      root: the PTB-XL directory (the one holding ptbxl_database.csv).
      length: samples per record after zero padding, at least 1000.

    Returns:
      `EcgData` with signals [N, length, 12], labels [N, 5], fold and ecg_id.

    Raises:
      FileNotFoundError: a CSV or a record file is missing (the message names it).
      ValueError: a CSV lacks a column or has a malformed value, or a record is
        not 100 Hz, not the 12 leads of `LEADS` (by count and by name), or not
        1000 samples long (the message names the record).
    """
    length = _as_count("length", length)
    if length < PTBXL_NUM_SAMPLES:
        raise ValueError(
            f"length must be at least {PTBXL_NUM_SAMPLES} (10 s at {PTBXL_FS} Hz). "
            f"Received: length={length}"
        )
    database_path = os.path.join(root, PTBXL_DATABASE_CSV)
    statements_path = os.path.join(root, SCP_STATEMENTS_CSV)
    diagnostic_class = _read_scp_statements(statements_path)
    rows = _read_database(database_path)

    with warnings.catch_warnings():
        # wfdb 4.3.1 calls pandas with arguments that pandas 3 deprecates; not ours to fix.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"wfdb(\.|$)")
        raw, labels, fold, record_ids = _read_records(root, rows, diagnostic_class, database_path)
    n = len(rows)
    is_test = fold == TEST_FOLD
    if not np.any(~is_test):
        raise ValueError(
            f"{database_path} has no record outside the test fold (strat_fold {TEST_FOLD}), "
            "so there is nothing to take the normalisation statistics from"
        )
    mean, std = _lead_statistics(raw[~is_test])
    signals = _normalise_and_pad(raw, mean, std, length)
    data = EcgData(
        signals=signals,
        labels=labels,
        fold=fold,
        record_ids=record_ids,
        fs=PTBXL_FS,
        num_samples=PTBXL_NUM_SAMPLES,
        mean=mean,
        std=std,
        source="ptbxl",
        description=(
            f"PTB-XL, {n} records at {PTBXL_FS} Hz ({int(is_test.sum())} in test fold "
            f"{TEST_FOLD}), padded to {length} samples"
        ),
    )
    logging.info("Loaded %s.", data.description)
    return data


def _read_records(
    root: str,
    rows: list[tuple[int, str, list[str], int]],
    diagnostic_class: Mapping[str, str],
    database_path: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw signals [N, 1000, 12] (mV), multi-hot labels, folds and ecg_ids of the rows."""
    import wfdb  # only needed for PTB-XL

    n = len(rows)
    raw = np.empty((n, PTBXL_NUM_SAMPLES, NUM_LEADS), dtype=np.float32)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    fold = np.empty(n, dtype=np.int64)
    record_ids = np.empty(n, dtype=np.int64)
    for i, (ecg_id, filename, codes, strat_fold) in enumerate(rows):
        record_ids[i] = ecg_id
        fold[i] = strat_fold
        for code in codes:
            cls = diagnostic_class.get(code)
            if cls is not None:
                labels[i, SUPERCLASSES.index(cls)] = 1.0
        raw[i] = _read_record(wfdb, os.path.join(root, filename), ecg_id, database_path)
        if (i + 1) % 5000 == 0:
            logging.info("Read %d of %d PTB-XL records.", i + 1, n)
    return raw, labels, fold, record_ids


def _read_csv(path: str, required: Sequence[str], what: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PTB-XL {what} {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"PTB-XL {what} {path} is empty")
        rows = [row for row in reader if row]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"PTB-XL {what} {path} lacks the column(s) {missing}. Received columns: {header}"
        )
    return header, rows


def _read_scp_statements(path: str) -> dict[str, str]:
    """SCP code -> superclass, for the diagnostic statements only."""
    header, rows = _read_csv(path, _STATEMENT_COLUMNS, "statement table")
    diag_col = header.index("diagnostic")
    class_col = header.index("diagnostic_class")
    out: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        value = row[diag_col].strip() if diag_col < len(row) else ""
        if not value:
            continue
        try:
            is_diagnostic = float(value) == 1.0
        except ValueError:
            raise ValueError(
                f"{path}, line {line}: diagnostic must be 1.0 or empty. Received: {value!r}"
            ) from None
        if not is_diagnostic:
            continue
        cls = row[class_col].strip() if class_col < len(row) else ""
        if cls not in SUPERCLASSES:
            raise ValueError(
                f"{path}, line {line}: the diagnostic code {row[0]!r} has diagnostic_class "
                f"{cls!r}, expected one of {SUPERCLASSES}"
            )
        out[row[0].strip()] = cls
    return out


def _read_database(path: str) -> list[tuple[int, str, list[str], int]]:
    """(ecg_id, filename_lr, SCP codes, strat_fold) per row of ptbxl_database.csv."""
    header, rows = _read_csv(path, _DATABASE_COLUMNS, "database")
    cols = [header.index(c) for c in _DATABASE_COLUMNS]
    out = []
    for line, row in enumerate(rows, start=2):
        if len(row) < len(header):
            raise ValueError(
                f"{path}, line {line}: expected {len(header)} fields. Received: {len(row)}"
            )
        ecg_id_s, filename, codes_s, fold_s = (row[c].strip() for c in cols)
        try:
            ecg_id = int(float(ecg_id_s))
            fold = int(float(fold_s))
        except ValueError:
            raise ValueError(
                f"{path}, line {line}: ecg_id and strat_fold must be integers. "
                f"Received: ecg_id={ecg_id_s!r}, strat_fold={fold_s!r}"
            ) from None
        if not 1 <= fold <= NUM_FOLDS:
            raise ValueError(
                f"{path}, line {line} (ecg_id={ecg_id}): strat_fold must be in "
                f"[1, {NUM_FOLDS}]. Received: strat_fold={fold}"
            )
        try:
            codes = ast.literal_eval(codes_s)
        except (ValueError, SyntaxError):
            codes = None
        if not isinstance(codes, dict):
            raise ValueError(
                f"{path}, line {line} (ecg_id={ecg_id}): scp_codes must be a dict literal "
                f"such as \"{{'NORM': 100.0}}\". Received: {codes_s!r}"
            )
        if not filename:
            raise ValueError(f"{path}, line {line} (ecg_id={ecg_id}): filename_lr is empty")
        out.append((ecg_id, filename, [str(c) for c in codes], fold))
    if not out:
        raise ValueError(f"PTB-XL database {path} lists no records")
    return out


def _read_record(wfdb, path: str, ecg_id: int, database_path: str) -> np.ndarray:
    """One record as float32 [1000, 12] (mV), checked against PTB-XL's 100 Hz format."""
    for ext in (".hea", ".dat"):
        if not os.path.isfile(path + ext):
            raise FileNotFoundError(
                f"PTB-XL record file {path + ext} (ecg_id={ecg_id}, listed in "
                f"{database_path}) does not exist"
            )
    signal, fields = wfdb.rdsamp(path)
    fs = fields.get("fs")
    if fs is None or not math.isclose(float(fs), PTBXL_FS):
        raise ValueError(
            f"PTB-XL record {path} (ecg_id={ecg_id}) must be sampled at {PTBXL_FS} Hz. "
            f"Received: fs={fs}"
        )
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[1] != NUM_LEADS:
        raise ValueError(
            f"PTB-XL record {path} (ecg_id={ecg_id}) must have {NUM_LEADS} leads. "
            f"Received: {signal.shape[1] if signal.ndim == 2 else signal.shape} "
            f"(sig_name={fields.get('sig_name')})"
        )
    names = [str(n).upper() for n in fields.get("sig_name") or []]
    if names and names != list(LEADS):
        missing = [lead for lead in LEADS if lead not in names]
        raise ValueError(
            f"PTB-XL record {path} (ecg_id={ecg_id}) must hold the leads {list(LEADS)} in "
            f"this order. Received: sig_name={fields.get('sig_name')}"
            + (f" (missing: {missing})" if missing else "")
        )
    if signal.shape[0] != PTBXL_NUM_SAMPLES:
        raise ValueError(
            f"PTB-XL record {path} (ecg_id={ecg_id}) must have {PTBXL_NUM_SAMPLES} samples "
            f"(10 s at {PTBXL_FS} Hz). Received: {signal.shape[0]} samples"
        )
    if not np.all(np.isfinite(signal)):
        raise ValueError(f"PTB-XL record {path} (ecg_id={ecg_id}) has NaN or infinite samples")
    return signal.astype(np.float32)


def _lead_statistics(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and std over all records and samples of raw [N, T, 12]."""
    total = np.zeros(raw.shape[-1])
    total_sq = np.zeros(raw.shape[-1])
    for start in range(0, raw.shape[0], _CHUNK):
        chunk = raw[start : start + _CHUNK].reshape(-1, raw.shape[-1]).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = raw.shape[0] * raw.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 1e-8, std, 1.0)  # a flat lead is left unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def _normalise_and_pad(
    raw: np.ndarray, mean: np.ndarray, std: np.ndarray, length: int
) -> np.ndarray:
    signals = np.zeros((raw.shape[0], length, raw.shape[2]), dtype=np.float32)
    signals[:, : raw.shape[1]] = (raw - mean) / std
    return signals


# --- Writing PTB-XL's layout ----------------------------------------------------------------

# One diagnostic SCP code per superclass, written for a record with that label, and the
# scp_statements.csv rows of every code written, as in PTB-XL (code: description,
# diagnostic, form, rhythm, diagnostic_class, diagnostic_subclass).
PTBXL_CODE_FOR_SUPERCLASS = {
    "NORM": "NORM",
    "MI": "IMI",
    "STTC": "NDT",
    "CD": "CLBBB",
    "HYP": "LVH",
}
_WRITTEN_STATEMENTS = {
    "NORM": ("normal ECG", "1.0", "", "", "NORM", "NORM"),
    "IMI": ("inferior myocardial infarction", "1.0", "", "", "MI", "IMI"),
    "NDT": ("non-diagnostic T abnormalities", "1.0", "1.0", "", "STTC", "STTC"),
    "CLBBB": ("complete left bundle branch block", "1.0", "", "", "CD", "CLBBB"),
    "LVH": ("left ventricular hypertrophy", "1.0", "", "", "HYP", "LVH"),
    "SR": ("sinus rhythm", "", "", "1.0", "", ""),
}
_WRITTEN_DATABASE_COLUMNS = "ecg_id patient_id scp_codes strat_fold filename_lr filename_hr".split()
_WRITTEN_STATEMENT_COLUMNS = [""] + (
    "description diagnostic form rhythm diagnostic_class diagnostic_subclass".split()
)
_PTBXL_ADC_GAIN = 1000.0  # digital units per mV: 1 uV resolution, as in PTB-XL
_PTBXL_MAX_DIGITAL = 32767  # format 16 holds -32768..32767; -32768 is wfdb's NaN
_WRITE_LOG_EVERY = 1000


def write_ptbxl_layout(data: EcgData, root: str, *, overwrite: bool = False) -> None:
    """Writes ECGs to `root` in PTB-XL's on-disk layout, so `load_ptbxl(root)` reads them.

    Writes, as the PTB-XL release holds them:

    * `root/ptbxl_database.csv` with the columns ecg_id, patient_id, scp_codes,
      strat_fold, filename_lr and filename_hr. Row i (0-based) of `data` gets
      ecg_id i + 1 (whatever `data.record_ids` holds), patient_id i + 1 (one
      patient per record), strat_fold `data.fold[i]` and filename_lr
      "records100/<thousands>/<ecg_id>_lr", e.g. "records100/01000/01234_lr".
      filename_hr names the 500 Hz record as in PTB-XL, which is not written.
    * `root/scp_statements.csv`, indexed by SCP code, with the columns
      description, diagnostic, form, rhythm, diagnostic_class and
      diagnostic_subclass, for the codes written.
    * One wfdb record per row, `root/<filename_lr>.hea` and `.dat`: 100 Hz, the
      12 leads of `LEADS` in mV, format 16 with gain 1000 and baseline 0 (1 uV
      resolution). The samples are the raw signals recovered from the z-scored
      ones, signals[:, :1000] * std + mean, rounded to 1 uV.

    Labels become SCP codes: one diagnostic code per superclass of the record
    (`PTBXL_CODE_FOR_SUPERCLASS`, e.g. MI -> "IMI"), likelihood 100.0, and the
    rhythm statement "SR" (sinus rhythm) with likelihood 0.0 on every record, as
    PTB-XL lists it; a record without a label has SR only, so it loads with an
    all-zero label. Labels and folds read back exactly; `load_ptbxl` takes its
    normalisation statistics from the written samples, so the signals read back
    within the 1 uV rounding.

    The database CSV is written last, so an interrupted write leaves a
    directory that `load_ptbxl` refuses rather than one listing missing records.
    Other files in `root` are left as they are.

    Args:
      data: 10 s records at 100 Hz (`fs` 100, `num_samples` 1000), e.g. from
        `make_synthetic_ecg(n, seed=...)` with its defaults.
      root: the directory to write to; created if needed.
      overwrite: replace a PTB-XL layout already in `root`: its two CSVs and the
        records of the same names (records the new database does not list are
        left, unread); else a `root` holding a ptbxl_database.csv is refused.

    Raises:
      FileExistsError: `root` already holds a ptbxl_database.csv and `overwrite`
        is False.
      ValueError: `data` does not fit PTB-XL's 100 Hz layout: fs is not 100,
        num_samples is not 1000, the arrays are not 12 leads with one label row
        and fold per record, a fold is outside 1..10, or a sample is not finite
        or outside the 16-bit range at 1 uV (|x| > 32.767 mV); the message names
        what was received.
    """
    _check_writable(data)
    database_path = os.path.join(root, PTBXL_DATABASE_CSV)
    if os.path.exists(database_path):
        if not overwrite:
            raise FileExistsError(
                f"{database_path} already exists; pass overwrite=True to replace the PTB-XL "
                f"layout in {root}"
            )
        os.remove(database_path)
    os.makedirs(root, exist_ok=True)
    import wfdb  # only needed for PTB-XL

    n = len(data)
    rows = []
    with warnings.catch_warnings():
        # wfdb 4.3.1 calls pandas with arguments that pandas 3 deprecates; not ours to fix.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"wfdb(\.|$)")
        for i in range(n):
            ecg_id = i + 1
            filename = _ptbxl_filename(ecg_id, PTBXL_FS)
            path = os.path.join(root, filename)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            wfdb.wrsamp(
                os.path.basename(path),
                fs=PTBXL_FS,
                units=["mV"] * NUM_LEADS,
                sig_name=list(LEADS),
                p_signal=_raw_record(data, i),
                fmt=["16"] * NUM_LEADS,
                adc_gain=[_PTBXL_ADC_GAIN] * NUM_LEADS,
                baseline=[0] * NUM_LEADS,
                write_dir=os.path.dirname(path),
            )
            hr_filename = _ptbxl_filename(ecg_id, 500)
            codes = repr(_scp_codes(data.labels[i]))
            rows.append((ecg_id, float(ecg_id), codes, int(data.fold[i]), filename, hr_filename))
            if (i + 1) % _WRITE_LOG_EVERY == 0:
                logging.info("Wrote %d of %d PTB-XL records to %s.", i + 1, n, root)

    with open(os.path.join(root, SCP_STATEMENTS_CSV), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_WRITTEN_STATEMENT_COLUMNS)
        writer.writerows((code, *row) for code, row in _WRITTEN_STATEMENTS.items())
    partial = database_path + ".partial"
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_WRITTEN_DATABASE_COLUMNS)
        writer.writerows(rows)
    os.replace(partial, database_path)
    logging.info("Wrote %d records (%s) in PTB-XL's layout to %s.", n, data.description, root)


def _scp_codes(label: np.ndarray) -> dict[str, float]:
    """PTB-XL's scp_codes of a multi-hot label: its diagnostic codes, then SR."""
    codes = {
        PTBXL_CODE_FOR_SUPERCLASS[c]: 100.0
        for c, v in zip(SUPERCLASSES, label, strict=True)
        if v > 0
    }
    codes["SR"] = 0.0
    return codes


def _ptbxl_filename(ecg_id: int, fs: int) -> str:
    """PTB-XL's record path, e.g. records100/01000/01234_lr (records500/.../01234_hr)."""
    suffix = "lr" if fs == PTBXL_FS else "hr"
    return f"records{fs}/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_{suffix}"


def _raw_record(data: EcgData, i: int) -> np.ndarray:
    """Record i in mV, float64 [1000, 12]: the z-scoring undone, the padding dropped."""
    z = data.signals[i, : data.num_samples].astype(np.float64)
    return z * data.std.astype(np.float64) + data.mean.astype(np.float64)


def _check_writable(data: EcgData) -> None:
    """Raises ValueError, naming what it received, if PTB-XL's 100 Hz layout can't hold data."""
    if data.fs != PTBXL_FS or data.num_samples != PTBXL_NUM_SAMPLES:
        raise ValueError(
            f"PTB-XL's layout holds 10 s records at {PTBXL_FS} Hz ({PTBXL_NUM_SAMPLES} "
            f"samples). Received: fs={data.fs}, num_samples={data.num_samples} "
            f"({data.description})"
        )
    n = len(data)
    shapes = (data.signals.shape, data.labels.shape, data.fold.shape)
    if (
        len(shapes[0]) != 3
        or shapes[0][0] != n
        or shapes[0][1] < data.num_samples
        or shapes[0][2] != NUM_LEADS
        or shapes[1:] != ((n, NUM_CLASSES), (n,))
    ):
        raise ValueError(
            f"signals, labels and fold must be [N, length >= {data.num_samples}, {NUM_LEADS}], "
            f"[N, {NUM_CLASSES}] and [N]. Received: shapes {shapes}"
        )
    bad = np.flatnonzero((data.fold < 1) | (data.fold > NUM_FOLDS))
    if bad.size:
        raise ValueError(
            f"PTB-XL's strat_fold is in [1, {NUM_FOLDS}]. Received: fold={data.fold[bad[0]]} "
            f"for record {bad[0]} (ecg_id {bad[0] + 1})"
        )
    limit = _PTBXL_MAX_DIGITAL / _PTBXL_ADC_GAIN
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        raw = np.stack([_raw_record(data, i) for i in range(start, stop)])
        outside = ~(np.abs(np.round(raw * _PTBXL_ADC_GAIN)) <= _PTBXL_MAX_DIGITAL)
        if np.any(outside):
            i, t, lead = np.argwhere(outside)[0]
            raise ValueError(
                f"PTB-XL's records hold finite samples of at most {limit:g} mV in magnitude "
                f"(16 bits at 1 uV). Received: {raw[i, t, lead]:g} mV in record {start + i} "
                f"(ecg_id {start + i + 1}), lead {LEADS[lead]}, sample {t}"
            )


# --- Synthetic ECGs --------------------------------------------------------------------------

# Prevalence of MI, STTC, CD and HYP; each is drawn independently, and NORM is
# "none of them": P(NORM) = 0.72 * 0.75 * 0.8 * 0.85 ~= 0.37.
SYNTHETIC_PREVALENCE = {"MI": 0.28, "STTC": 0.25, "CD": 0.2, "HYP": 0.15}

# Waves of one beat, times in seconds relative to the R peak. The T wave's
# offset and width scale with sqrt(RR) (Bazett), the others are fixed; the QRS
# waves (Q, R, S) are stretched for CD. "ST" is a plateau from the J point to
# the T peak, zero unless a label moves it.
_WAVES = ("P", "Q", "R", "S", "ST", "T")
_WAVE_MU = np.array([-0.16, -0.03, 0.0, 0.03, 0.0, 0.27])
_WAVE_SIGMA = np.array([0.022, 0.01, 0.012, 0.01, 0.0, 0.045])
# Amplitudes in mV per wave (rows, as _WAVES) and lead (columns, as LEADS).
_WAVE_AMPLITUDE = np.array(
    [
        [0.08, 0.12, 0.05, -0.10, 0.03, 0.08, 0.06, 0.08, 0.08, 0.08, 0.08, 0.08],  # P
        [-0.05, -0.06, -0.03, 0.0, -0.05, -0.04, 0.0, 0.0, 0.0, -0.03, -0.06, -0.06],  # Q
        [0.6, 1.0, 0.4, -0.7, 0.3, 0.7, 0.2, 0.5, 0.8, 1.1, 1.2, 1.0],  # R
        [-0.1, -0.2, -0.2, 0.1, -0.1, -0.2, -0.9, -1.2, -0.8, -0.5, -0.3, -0.2],  # S
        [0.0] * NUM_LEADS,  # ST
        [0.2, 0.3, 0.1, -0.25, 0.1, 0.2, 0.05, 0.4, 0.45, 0.4, 0.3, 0.25],  # T
    ]
)
# Leads of the two infarct territories (ST elevation) and of the T inversion.
_ANTERIOR = (6, 7, 8, 9)  # V1-V4
_INFERIOR = (1, 2, 5)  # II, III, aVF
_LATERAL_AND_PRECORDIAL = (0, 4, 7, 8, 9, 10, 11)  # I, aVL, V2-V6
_CHUNK = 512  # records built at a time, to bound memory


def make_synthetic_ecg(
    num_records: int,
    *,
    length: int = DEFAULT_LENGTH,
    fs: int = PTBXL_FS,
    seed: int,
    duration_s: float = 10.0,
) -> EcgData:
    """Synthetic 12-lead ECGs whose five superclass labels are visible in the waveform.

    Each record is `duration_s` seconds of sinus rhythm at a heart rate drawn
    from U[50, 110] bpm (with 3% beat-to-beat RR jitter). Every beat is a sum of
    Gaussian bumps, P, Q, R, S and T, with lead-specific amplitudes and
    polarities (e.g. everything inverted in aVR, a deep S in V1-V2, a tall R in
    V4-V5) and per-record amplitude jitter. Baseline wander (one sinusoid of
    0.05-0.5 Hz with lead-specific amplitude and phase) and white noise are
    added.

    Labels MI, STTC, CD and HYP are drawn independently with the prevalences of
    `SYNTHETIC_PREVALENCE`; NORM is on exactly when none of them is. When a
    label is on, its morphology is applied:

    * MI: ST elevation of 0.15-0.35 mV from the J point to the T peak in the
      anterior (V1-V4) or the inferior (II, III, aVF) leads, with deeper Q waves
      there.
    * STTC: T waves inverted (scaled by -0.4 to -1.0) and ST depressed by
      0.05-0.1 mV in I, aVL and V2-V6.
    * CD: QRS widened: the Q, R and S waves stretched 1.8-2.6 times in time.
    * HYP: QRS voltage (R and S) multiplied by 1.7-2.3 in every lead.

    The raw signals (in mV) are z-scored per lead with the statistics of the
    non-test records, as in `load_ptbxl`, then zero padded to `length`. Folds
    1..10 are assigned in equal shares at random; fold 10 is the test set.

    Args:
      num_records: number of records, at least 1.
      length: samples per record after padding, at least round(duration_s * fs).
      fs: sampling rate in Hz, at least 50.
      seed: the records depend on this seed only.
      duration_s: recording length in seconds before padding.

    Returns:
      `EcgData` with source "synthetic" and metadata "r_peak_s" and
      "heart_rate_bpm".
    """
    num_records = _as_count("num_records", num_records)
    if num_records < 1:
        raise ValueError(f"num_records must be at least 1. Received: num_records={num_records}")
    fs = _as_count("fs", fs)
    if fs < 50:
        raise ValueError(f"fs must be at least 50 Hz to resolve a QRS complex. Received: fs={fs}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive. Received: duration_s={duration_s!r}")
    num_samples = int(round(duration_s * fs))
    length = _as_count("length", length)
    if length < num_samples:
        raise ValueError(
            f"length must be at least {num_samples} (duration_s={duration_s} at fs={fs}). "
            f"Received: length={length}"
        )
    rng = np.random.default_rng(seed)
    n = num_records

    # Labels: independent draws, NORM when none is on.
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    for name, p in SYNTHETIC_PREVALENCE.items():
        labels[:, SUPERCLASSES.index(name)] = rng.random(n) < p
    labels[:, 0] = labels[:, 1:].sum(axis=1) == 0
    mi, sttc, cd, hyp = (labels[:, SUPERCLASSES.index(c)] > 0 for c in ("MI", "STTC", "CD", "HYP"))

    # Rhythm: R-peak times, starting one beat before t=0 so the first P wave exists.
    heart_rate = rng.uniform(50.0, 110.0, n)
    rr = 60.0 / heart_rate
    max_beats = int(math.ceil(duration_s / (60.0 / 110.0 * 0.85))) + 3
    intervals = rr[:, None] * (1.0 + 0.03 * rng.standard_normal((n, max_beats)))
    first = rng.uniform(0.0, 1.0, n) * rr - rr
    r_peaks = first[:, None] + np.cumsum(intervals, axis=1) - intervals[:, :1]

    # Per-record wave shapes: centre and width [n, W], amplitude [n, W, L].
    sqrt_rr = np.sqrt(rr)
    mu = np.broadcast_to(_WAVE_MU, (n, len(_WAVES))).copy()
    sigma = np.broadcast_to(_WAVE_SIGMA, (n, len(_WAVES))).copy()
    mu[:, 5] *= sqrt_rr
    sigma[:, 5] *= sqrt_rr
    widen = np.where(cd, rng.uniform(1.8, 2.6, n), 1.0)
    mu[:, 1:4] *= widen[:, None]
    sigma[:, 1:4] *= widen[:, None]
    amp = _WAVE_AMPLITUDE[None] * rng.lognormal(0.0, 0.15, (n, len(_WAVES), NUM_LEADS))
    amp *= rng.lognormal(0.0, 0.1, (n, 1, 1))  # overall voltage of the record
    amp[:, 2:4] *= np.where(hyp, rng.uniform(1.7, 2.3, n), 1.0)[:, None, None]
    territory = np.zeros((n, NUM_LEADS), dtype=bool)
    anterior = rng.random(n) < 0.5
    territory[np.ix_(mi & anterior, _ANTERIOR)] = True
    territory[np.ix_(mi & ~anterior, _INFERIOR)] = True
    amp[:, 4] += territory * rng.uniform(0.15, 0.35, (n, 1))
    amp[:, 1] -= territory * rng.uniform(0.05, 0.2, (n, 1))
    inverted = np.zeros((n, NUM_LEADS), dtype=bool)
    inverted[np.ix_(sttc, _LATERAL_AND_PRECORDIAL)] = True
    amp[:, 5] = np.where(inverted, -np.abs(amp[:, 5]) * rng.uniform(0.4, 1.0, (n, 1)), amp[:, 5])
    amp[:, 4] -= inverted * rng.uniform(0.05, 0.1, (n, 1))

    wander_freq = rng.uniform(0.05, 0.5, n)
    wander_phase = rng.uniform(0.0, 2 * np.pi, (n, NUM_LEADS))
    wander_amp = rng.uniform(0.02, 0.2, (n, NUM_LEADS))
    noise_std = rng.uniform(0.01, 0.04, n)

    t = (np.arange(num_samples) / fs).astype(np.float32)
    r_peaks32 = r_peaks.astype(np.float32)
    mu32, sigma32, amp32 = (a.astype(np.float32) for a in (mu, sigma, amp))
    raw = np.empty((n, num_samples, NUM_LEADS), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        s = slice(start, min(start + _CHUNK, n))
        beats = _beat_waves(t, r_peaks32[s], mu32[s], sigma32[s])  # [c, W, T]
        x = np.matmul(beats.transpose(0, 2, 1), amp32[s])  # [c, T, L]
        angle = (2 * np.pi * wander_freq[s]).astype(np.float32)[:, None, None] * t[None, :, None]
        angle = angle + wander_phase[s].astype(np.float32)[:, None, :]
        x += wander_amp[s].astype(np.float32)[:, None, :] * np.sin(angle)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        x += noise_std[s][:, None, None].astype(np.float32) * noise
        raw[s] = x

    fold = (rng.permutation(n) % NUM_FOLDS + 1).astype(np.int64)
    is_test = fold == TEST_FOLD
    mean, std = _lead_statistics(raw[~is_test] if np.any(~is_test) else raw)
    signals = _normalise_and_pad(raw, mean, std, length)
    r_peak_s = np.where(r_peaks < duration_s, r_peaks, np.nan).astype(np.float32)
    return EcgData(
        signals=signals,
        labels=labels,
        fold=fold,
        record_ids=np.arange(n, dtype=np.int64),
        fs=fs,
        num_samples=num_samples,
        mean=mean,
        std=std,
        source="synthetic",
        description=(
            f"synthetic 12-lead ECG, {n} records of {duration_s:g} s at {fs} Hz "
            f"(seed {seed}), padded to {length} samples"
        ),
        metadata={"r_peak_s": r_peak_s, "heart_rate_bpm": heart_rate.astype(np.float32)},
    )


def _beat_waves(
    t: np.ndarray, r_peaks: np.ndarray, mu: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """Unit-amplitude waves [c, W, T] summed over the two R peaks around each sample.

    A sample at time t between R peaks k-1 and k gets the waves of both beats,
    evaluated at t - r[k-1] and t - r[k], which covers the T wave of the beat
    before and the P wave and Q of the beat after.
    """
    after = np.sum(r_peaks[:, :, None] <= t[None, None, :], axis=1)  # index of next R peak
    after = np.clip(after, 1, r_peaks.shape[1] - 1)
    prev_r = np.take_along_axis(r_peaks, after - 1, axis=1)  # [c, T]
    next_r = np.take_along_axis(r_peaks, after, axis=1)
    out = np.zeros((r_peaks.shape[0], mu.shape[1], t.shape[0]), dtype=np.float32)
    for r in (prev_r, next_r):
        tau = (t[None, :] - r)[:, None, :]  # [c, 1, T]
        m = mu[:, :, None]
        sd = np.maximum(sigma[:, :, None], 1e-6)
        gauss = np.exp(-0.5 * ((tau - m) / sd) ** 2)
        # ST plateau: rises at the J point (end of S), falls at the T peak.
        j_point = mu[:, 3] + 2.5 * sigma[:, 3]
        t_peak = mu[:, 5]
        plateau = _sigmoid((tau[:, 0] - j_point[:, None]) / 0.008) * _sigmoid(
            (t_peak[:, None] - tau[:, 0]) / 0.02
        )
        gauss[:, 4] = plateau
        out += gauss
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --- Fine-tuning splits ----------------------------------------------------------------------


def ft_sizes(n: int) -> tuple[int, int]:
    """(train, val) sizes for N labelled fine-tuning examples.

    The reference regimes: N=10 -> 5/5, N=25 -> 15/10, N>=50 -> 80/20
    (train = round(0.8 N)). Any other N >= 2 also gets 80/20, rounded, with at
    least one example on each side.
    """
    n = _as_count("n", n)
    if n < 2:
        raise ValueError(f"n must be at least 2 (one train and one val example). Received: n={n}")
    if n == 10:
        return 5, 5
    if n == 25:
        return 15, 10
    train = min(max(math.floor(0.8 * n + 0.5), 1), n - 1)
    return train, n - train


def ft_split(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws N labelled examples and splits them into FT train and val indices.

    The N examples are a uniformly random subset of the rows of `labels`; they
    are split by `ft_sizes` (10 -> 5/5, 25 -> 15/10, N>=50 -> 80/20). The split
    is loosely stratified: the N examples are ordered so that every label
    combination is spread evenly, so train and val get it in about their shares.

    Args:
      labels: [M, 5] multi-hot labels (or [M] class ids) of the pool to draw from.
      n: number of labelled examples N, 2 <= N <= M.
      seed: the draw depends on this seed only.

    Returns:
      (train_idx, val_idx): sorted, disjoint int64 positions into `labels`.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2):
        raise ValueError(f"labels must be [M] or [M, classes]. Received: shape={labels.shape}")
    num_train, num_val = ft_sizes(n)
    available = labels.shape[0]
    if num_train + num_val > available:
        raise ValueError(f"n must be at most {available} (the examples in labels). Received: n={n}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(available, size=num_train + num_val, replace=False)
    rows = labels[chosen].reshape(chosen.size, -1)
    _, combo = np.unique(rows, axis=0, return_inverse=True)
    combo = combo.reshape(-1)
    keys = np.empty(chosen.size)
    for c in np.unique(combo):
        members = np.flatnonzero(combo == c)
        members = members[rng.permutation(members.size)]
        keys[members] = (np.arange(members.size) + rng.random()) / members.size
    order = chosen[np.argsort(keys, kind="stable")]
    return (
        np.sort(order[:num_train]).astype(np.int64),
        np.sort(order[num_train:]).astype(np.int64),
    )


# --- Batches ---------------------------------------------------------------------------------


def make_dataset(
    signals: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    repeat: bool = True,
    shuffle: bool = True,
) -> tf.data.Dataset:
    """Batches of ECGs as a seeded, checkpointable `tf.data.Dataset`.

    Each element is a dict: "signal" float32 [B, length, 12], "label" float32
    [B, 5] and "index" int64 [B] (positions into the arrays). Batches are full
    (the last partial batch of an epoch is dropped); with `shuffle` each epoch
    is a fresh permutation depending on (seed, epoch) only. Only indices flow
    through the shuffle, so `tf.train.Checkpoint(iterator=iter(ds))` is small
    and a restored iterator continues with the same batches (see
    `metapt_tf.data.make_dataset`).

    Args:
      signals: [N, length, 12] signals.
      labels: [N, 5] multi-hot labels.
      batch_size: examples per batch, in [1, N].
      seed: the order of the examples depends on this seed only.
      repeat: repeat forever; else one epoch.
      shuffle: shuffle the examples every epoch; else keep their order.
    """
    signals = np.asarray(signals, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if signals.ndim != 3 or signals.shape[2] != NUM_LEADS:
        raise ValueError(
            f"signals must be [N, length, {NUM_LEADS}] (the leads {', '.join(LEADS)}). "
            f"Received: shape={signals.shape}"
        )
    if labels.ndim != 2 or labels.shape != (signals.shape[0], NUM_CLASSES):
        raise ValueError(
            f"labels must be [N, {NUM_CLASSES}] (multi-hot over {', '.join(SUPERCLASSES)}) with "
            f"N={signals.shape[0]} as in signals. Received: shape={labels.shape}"
        )
    return mnist.make_dataset(
        {"signal": signals, "label": labels},
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
    )


def _as_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer. Received: {name}={value!r}")
    return int(value)
