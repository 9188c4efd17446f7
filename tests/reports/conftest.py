import pytest


@pytest.fixture(scope="module")
def report_data_dir(tmp_path_factory):
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    root = tmp_path_factory.mktemp("reportdata")
    generate_shapes(root / "shapes", seed=1, num_images=12, progress=False)
    return root


@pytest.fixture(scope="module")
def soho_run(report_data_dir, tmp_path_factory):
    """A few SOHO updates on shapes VQA, with mmf_predict output on the test split."""
    from mmf_plugins.cli.predict import predict
    from mmf_plugins.cli.run import run

    save = tmp_path_factory.mktemp("runs") / "soho"
    opts = ["config=projects/soho/configs/vqa2/demo.yaml", "model=soho", "datasets=vqa2",
            f"env.data_dir={report_data_dir}", f"env.save_dir={save}", "training.num_workers=0",
            "training.batch_size=4", "dataset_config.vqa2.processors.image_processor.params.min_size=64",
            "dataset_config.vqa2.processors.image_processor.params.max_size=96"]
    run(opts + ["run_type=train_val", "training.max_updates=4", "training.evaluation_interval=2",
                "training.checkpoint_interval=4", "training.log_interval=2"])
    predict(opts + [f"checkpoint.resume_file={save / 'soho_final.safetensors'}"])
    return save
