"""The files a training run leaves for the apps: the best validation metric and the network record."""

from __future__ import annotations

import json

from ignite.engine import Engine, Events

from scripts.training.best_metric import BestMetricWriter
from scripts.training.network_record import save_network_record


def test_the_best_metric_file_follows_every_improvement_and_only_those(tmp_path):
    scores = iter([0.2, 0.5, 0.4, 0.7])
    writes = []
    path = tmp_path / "models" / "best_metric.json"

    def update_best(engine: Engine) -> None:  # what MONAI's evaluator does before its handlers
        value = next(scores)
        engine.state.metrics = {"val_bpq": value}
        if value > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = value, engine.state.epoch

    engine = Engine(lambda e, batch: None)
    engine.state.key_metric_name, engine.state.best_metric, engine.state.best_metric_epoch = "val_bpq", -1, -1
    engine.add_event_handler(Events.EPOCH_COMPLETED, update_best)
    BestMetricWriter(path).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: writes.append(json.loads(path.read_text())))
    engine.run([0], max_epochs=4)
    assert writes == [{"metric": "val_bpq", "value": 0.2, "epoch": 1}, {"metric": "val_bpq", "value": 0.5, "epoch": 2},
                      {"metric": "val_bpq", "value": 0.5, "epoch": 2}, {"metric": "val_bpq", "value": 0.7, "epoch": 4}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["best_metric.json"]  # no temporary left


def test_the_network_record_is_an_args_file_of_the_workflows(tmp_path):
    from monai.bundle import ConfigParser
    from scripts.workflows.configs import config_files

    settings = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "use_adapter": True,
                "official_normalization": None, "patch_size": 64}
    path = save_network_record(tmp_path, settings)
    assert path == tmp_path / "overrides.json" and json.loads(path.read_text()) == settings
    parser = ConfigParser()
    parser.read_config(config_files("inferring"))
    parser.update(ConfigParser.load_config_file(str(path)))
    assert {key: parser[key] for key in settings} == settings
