"""The report's tables (hanprune/report.py): each figure in its cell, from metrics made up here."""
from hanprune import report


def _metrics(**change):
    layers = {"fc1": {"params": 30, "nonzero": 8, "weights": 20, "weights_nonzero": 5, "kept": 0.25,
                      "bytes_dense": 120, "bytes_nonzero": 32, "bytes_csr": 94, "flops_dense": 40, "flops_pruned": 10},
              "fc2": {"params": 12, "nonzero": 6, "weights": 10, "weights_nonzero": 4, "kept": 0.4,
                      "bytes_dense": 48, "bytes_nonzero": 24, "bytes_csr": 48, "flops_dense": 20, "flops_pruned": 8}}
    m = {"test_dense": 0.9876, "test_pruned": 0.9845, "test_compressed": 0.9801, "params_dense": 42,
         "params_nonzero": 14, "compression": 3.0, "bytes_dense": 168, "bytes_nonzero": 56, "bytes_csr": 142,
         "flops_dense": 60, "flops_pruned": 18, "flops_kept": 0.3, "file_compression": 8.4, "layers": layers,
         "file_bytes": {"dense": 168, "pruned_values": 56, "pruned_csr": 142, "quantized_fixed": 30, "compressed": 20}}
    return {**m, **change}


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]


def _row(table: str, first: str) -> list[str]:
    return next(row for row in _rows(table) if row[0] == first)


def test_target_line_compares_errors_and_compression_with_the_model_s_floors():
    assert report.target_line("lenet5", _metrics()) == ("Target: dense and pruned test error ≤ 1.10% at ≥ 10x. Measured: "
                                                        "dense 1.24%, pruned 1.55% at 3.0x: **NOT met**.")
    met = report.target_line("lenet5", _metrics(test_dense=0.995, test_pruned=0.99, compression=10.0))
    assert met.endswith("dense 0.50%, pruned 1.00% at 10.0x: **met**.")
    assert report.target_line("small_resnet", _metrics()) == ""


def test_model_tables_hold_each_layer_s_counts_and_the_totals():
    text = report.model_tables("m", _metrics())
    assert _row(text, "fc1.weight") == ["fc1.weight", "0.02", "0.01", "0.01", "75.0%"]
    assert _row(text, "fc2.bias") == ["fc2.bias", "0.00", "0.00", "0.00", "0.0%"]
    assert _row(text, "fc1") == ["fc1", "0.12", "0.03", "0.09", "73.3%"]  # the first table with layer rows: bytes
    assert _row(text, "m (pruned)") == ["m (pruned)", "98.45%", "0.01", "3.00x"]
    assert ["**TOTAL**", "**0.17**", "**0.06**", "**0.14**"] in _rows(text)  # the CSR table's totals (KB)


def test_compression_table_gives_each_file_s_size_ratio_and_error():
    q = {"bits": {"fc1": 5, "fc2": 4}, "val_before": 0.99, "val_shared": 0.95, "val_finetuned": 0.985}
    text = report.compression_table("lenet_300_100", _metrics(), q)
    assert _row(text, "+ Huffman and Rice coding") == ["+ Huffman and Rice coding", "`compressed.bin`", "20", "8.4x",
                                                       "1.99%", "27 KB (40x), error 1.58%"]
    assert _row(text, "pruned, CSR (values + int32 indices)")[2:5] == ["142", "1.2x", "1.55%"]
    assert "Weight sharing with fc1 5, fc2 4 bits; validation accuracy 0.9900 pruned, 0.9500 right after k-means, " \
           "0.9850 after fine-tuning" in text
    assert text.endswith("Measured: 8.4x at 1.99%: **NOT met**.")


def test_iteration_rounds_and_selection_tables():
    csv = "iteration,val_pruned,val_retrained,compression\n0,,,1.0000\n1,0.5,0.97,2.5000\n"
    text = report.iteration_table(csv)
    assert _row(text, "0") == ["0", "-", "-", "1.00x"] and _row(text, "1") == ["1", "50.00%", "97.00%", "2.50x"]
    rounds = [{"iteration": "1", "rule": "std", "key": "s", "values": {"fc1": 0.5, "fc2": 1.25}, "set_by_budget": ["fc2"],
               "budget": {"max_drop": 0.01, "scale": 1.0}, "val_retrained": 0.97, "compression": 2.5},
              {"iteration": "2", "rule": "std", "key": "s", "values": {"fc1": 1.0, "fc2": 1.5}, "set_by_budget": [],
               "budget": None, "val_retrained": 0.96, "compression": 4.0}]
    text = report.rounds_table(rounds, {"round": 2})
    assert _row(text, "1") == ["1", "std", "s: fc1 0.5, fc2 1.25*", "max_drop 0.01, scale 1", "97.00%", "2.50x"]
    assert _row(text, "2 (selected)")[4:] == ["96.00%", "4.00x"]
    selection = {"round": 2, "rounds": 2, "compression": 4.0, "val": 0.96, "val_dense": 0.97, "max_drop": 0.02}
    assert "round 2 of 2, 4.0x, val 96.00% against dense 97.00%" in report.selection_line({**selection, "held": True})
    assert report.selection_line({**selection, "held": False}).endswith("Rule held: **no**.")


def test_schedule_table_sets_each_layer_s_value_beside_the_nearest_scan_point():
    scan = ("layer,s,kept_percent,val_accuracy\nfc1,0.0,100.0,0.98\nfc1,1.0,40.0,0.90\nfc1,2.0,10.0,0.30\n"
            "fc2,0.0,100.0,0.98\nfc2,1.0,50.0,0.97\n")
    text = report.schedule_table({"fc1": 1.2, "fc2": 0.4}, scan, _metrics())
    assert _row(text, "fc1") == ["fc1", "1.2", "25.0%", "1", "90.00%", "30.0%"]
    assert _row(text, "fc2") == ["fc2", "0.4", "40.0%", "0", "98.00%", "97.0%"]


def test_models_of_one_architecture_and_kwargs_are_compared():
    models = {"a": ("lenet5", {}), "b": ("lenet_300_100", {}), "a_q": ("lenet5", {}), "c": ("x:Net", {"w": 8}),
              "c2": ("x:Net", {"w": 16}), "a_g": ("lenet5", {})}
    assert report.rule_groups(models) == [["a", "a_q", "a_g"]]  # other kwargs: another architecture


def test_rules_table_and_figure_per_model_of_a_group(tmp_path):
    lines = {"m": {"rule": "std", "selected": 2, "rounds": "iteration,compression,val_retrained,test_accuracy\n"
                                                           "1,2.0000,0.99,0.985\n2,4.0000,0.98,0.975\n"},
             "m_global": {"rule": "global", "selected": 1, "rounds": "iteration,compression,val_retrained,test_accuracy\n"
                                                                      "1,3.0000,0.97,0.96\n"}}
    selections = {"m": {"round": 2, "rounds": 2, "held": True, "val_dense": 0.99, "val": 0.98},
                  "m_global": {"round": 1, "rounds": 1, "held": False, "val_dense": 0.99, "val": 0.97}}
    metrics = {"m": _metrics(), "m_global": _metrics(compression=3.0, test_pruned=0.96)}
    text = report.rules_table(lines, selections, metrics)
    assert _row(text, "std") == ["std", "`m`", "2 of 2", "3.00x", "8.4x", "1.00%", "2.00%", "1.24%", "1.55%", "1.99%"]
    assert _row(text, "global")[2] == "1 of 1 (rule not held)" and _row(text, "global")[8] == "4.00%"
    saved = {}

    def save(fig, path):
        saved["lines"] = [(tuple(l.get_xdata()), tuple(l.get_ydata())) for l in fig.axes[0].get_lines()]
        saved["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return path.name
    assert report.rules_figure("lenet_300_100", lines, tmp_path / "r.png", save) == "r.png"
    std_line, std_ring, global_line, global_ring, paper = saved["lines"][:5]
    assert std_line[0] == (2.0, 4.0) and [round(y, 6) for y in std_line[1]] == [1.5, 2.5]
    assert std_ring[0] == (4.0,) and global_ring[0] == (3.0,)  # the selected rounds
    assert paper == ((12.0,), (1.59,))  # Han et al. 2015's LeNet-300-100
    assert saved["labels"][:3] == ["std (m)", "global (m_global)", "Han et al. 2015 (1.59%)"]
