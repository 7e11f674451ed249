"""NIfTI case folders: BraTS 2023 and 2021 names, nnU-Net channels from dataset.json, label files, bad input."""

from __future__ import annotations

import json

import pytest

from brainmets.inputs.cases import CaseError, CaseFiles, channel_sequence, find_cases, is_case_file, read_dataset_json

BRATS_2023 = "BraTS-MET-00001-000"
DATASET = {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1Gd", "3": "T2"}, "labels": {"background": 0, "met": 1},
           "numTraining": 1, "file_ending": ".nii.gz"}


def test_a_brats_2023_case_maps_each_suffix_and_passes_over_its_label_file():
    folder = f"train/{BRATS_2023}"
    keys = [f"{folder}/{BRATS_2023}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")]
    (case,), ignored = find_cases(keys)
    assert case == CaseFiles(BRATS_2023, {"t1_pre": keys[0], "flair": keys[3], "t1_post": keys[1], "t2": keys[2]},
                             "BraTS 2023", {"t1_pre": "'-t1n' (BraTS 2023)", "flair": "'-t2f' (BraTS 2023)",
                                            "t1_post": "'-t1c' (BraTS 2023)", "t2": "'-t2w' (BraTS 2023)"})
    assert ignored == [f"{keys[4]}: a label file (segmentation), not segmented"]


def test_a_brats_2021_case_with_nii_endings_and_a_missing_sequence():
    keys = ["BraTS2021_00000_flair.nii", "BraTS2021_00000_t1ce.nii", "BraTS2021_00000_t2.nii",
            "BraTS2021_00000_seg.nii"]
    (case,), ignored = find_cases(keys)
    assert (case.case, case.naming) == ("BraTS2021_00000", "BraTS 2021")
    assert case.files == {"flair": keys[0], "t1_post": keys[1], "t2": keys[2]}  # no _t1: the reader fills it
    assert case.how["t1_post"] == "'_t1ce' (BraTS 2021)"
    assert ignored == ["BraTS2021_00000_seg.nii: a label file (segmentation), not segmented"]


def test_several_cases_are_told_apart_by_id_and_by_folder():
    keys = ["a/p1-t2f.nii.gz", "a/p1-t1c.nii.gz", "a/p2-t2f.nii.gz", "b/p1-t2f.nii.gz", "notes.nii.gz"]
    cases, ignored = find_cases(keys)
    assert [(c.case, sorted(c.files.values())) for c in cases] == [
        ("p1", ["a/p1-t1c.nii.gz", "a/p1-t2f.nii.gz"]), ("p2", ["a/p2-t2f.nii.gz"]), ("p1", ["b/p1-t2f.nii.gz"])]
    assert len(ignored) == 1 and ignored[0].startswith("notes.nii.gz: not named as a case's sequence")


def test_nnunet_channels_follow_the_dataset_order_not_the_model_order():
    keys = [f"imagesTs/BRAIN_007_{i:04d}.nii.gz" for i in range(4)] + ["labelsTs/BRAIN_007.nii.gz"]
    (case,), ignored = find_cases(keys, ["FLAIR", "T1", "T1Gd", "T2"])
    assert (case.case, case.naming) == ("BRAIN_007", "nnU-Net")
    assert case.files == {"t1_pre": keys[1], "flair": keys[0], "t1_post": keys[2], "t2": keys[3]}
    assert case.how["flair"] == "channel 0 'FLAIR' of dataset.json"
    assert ignored == ["labelsTs/BRAIN_007.nii.gz: a label file (segmentation), not segmented"]
    (case,), _ = find_cases(keys[:4], ["T1", "FLAIR", "T1Gd", "T2"], channels_from="--channels")
    assert case.files["flair"] == keys[1] and case.how["flair"] == "channel 1 'FLAIR' of --channels"


def test_an_nnunet_channel_of_no_sequence_read_is_passed_over_and_one_beyond_the_names_refused():
    keys = ["x_0000.nii.gz", "x_0001.nii.gz"]
    (case,), ignored = find_cases(keys, ["FLAIR", "ADC"])
    assert case.files == {"flair": "x_0000.nii.gz"}
    assert ignored == ["x_0001.nii.gz: channel 1 'ADC' of dataset.json, none of the sequences read "
                       "(t1_pre, flair, t1_post, t2)"]
    with pytest.raises(CaseError, match=r"x_0001.nii.gz: channel 1, but dataset.json names 1 channel\(s\) \(FLAIR\)"):
        find_cases(keys, ["FLAIR"])


def test_nnunet_names_without_channel_names_say_what_to_give():
    with pytest.raises(CaseError, match=r"x_0000.nii.gz, x_0001.nii.gz: nnU-Net names .* dataset.json .* --channels"):
        find_cases(["x_0000.nii.gz", "x_0001.nii.gz", "y-t2f.nii.gz"])


@pytest.mark.parametrize("keys", [["x-t2f.nii.gz", "x-t2f.nii"], ["x-t2f.nii.gz", "x-T2F.nii.gz"]])
def test_two_files_claiming_one_sequence_are_refused_naming_both(keys):
    with pytest.raises(CaseError, match=f"{keys[0]} and {keys[1]} both claim the flair sequence of case x"):
        find_cases(keys)


def test_two_nnunet_channels_of_one_sequence_are_refused_naming_both():
    with pytest.raises(CaseError, match="c_0000.nii.gz and c_0001.nii.gz both claim the t1_pre sequence"):
        find_cases(["c_0000.nii.gz", "c_0001.nii.gz"], ["T1", "T1w"])


@pytest.mark.parametrize("names, sequence", [
    (("T1", "t1w", "T1n", "native", "T1 pre"), "t1_pre"),
    (("FLAIR", "flair", "T2f", "T2-FLAIR", "t2_flair"), "flair"),
    (("T1CE", "t1c", "T1Gd", "t1gd", "T1post", "T1-Gd"), "t1_post"),
    (("T2", "T2w", "t2w"), "t2"),
    (("ADC", "DWI", "CT", ""), None),
])
def test_channel_names_are_matched_over_the_usual_spellings(names, sequence):
    assert [channel_sequence(n) for n in names] == [sequence] * len(names)


def test_is_case_file_tells_a_case_folder_from_unrelated_volumes():
    for key in ("p-t2f.nii.gz", "p_flair.nii", "P_T1CE.NII.GZ", "CASE_0003.nii.gz", "p-seg.nii.gz",
                "labelsTr/CASE.nii.gz"):
        assert is_case_file(key), key
    for key in ("scan.nii.gz", "p-t2f.png", "flair.nii.gz", "CASE_003.nii.gz", "p-t2fx.nii.gz"):
        assert not is_case_file(key), key


def test_a_dataset_json_is_read_in_channel_order():
    channels = {"1": "T1w", "0": "FLAIR", "2": "t1gd"}
    dataset = read_dataset_json(json.dumps({"channel_names": channels, "labels": {"background": 0}}).encode())
    assert list(dataset["channel_names"].values()) == ["FLAIR", "T1w", "t1gd"]
    v1 = read_dataset_json(json.dumps({"modality": {"0": "FLAIR"}, "labels": {"0": "background"}}).encode())
    assert v1["channel_names"] == {"0": "FLAIR"}  # nnU-Net v1 (the Medical Segmentation Decathlon) said modality


@pytest.mark.parametrize("content, error", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (json.dumps({"labels": {"background": 0}}).encode(), "no channel_names"),
    (json.dumps({**DATASET, "channel_names": {"0": "FLAIR", "2": "T1"}}).encode(),
     "channel_names must map '0'..'1' to names"),
    (json.dumps({**DATASET, "channel_names": {"0": 7}}).encode(), "channel_names must map '0'..'0' to names"),
    (json.dumps({**DATASET, "labels": None}).encode(), "no labels object"),
    (json.dumps({**DATASET, "file_ending": ".png"}).encode(), "file_ending '.png'; only NIfTI"),
])
def test_a_bad_dataset_json_is_refused_saying_what_is_wrong(content, error):
    with pytest.raises(CaseError, match=f"^Dataset001/dataset.json: {error}"):
        read_dataset_json(content, "Dataset001/dataset.json")
