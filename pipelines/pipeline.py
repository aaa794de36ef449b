"""The whole QIN flow as a Kubeflow Pipelines v2 pipeline (also runs on Vertex AI Pipelines):

  acquire raw logs (generate, or ingest canonical / KuaiSAR / JDsearch) -> preprocess (Beam)
  -> train -> evaluate                                      (the QIN ranker)
  -> build the item-to-item table, train PDR -> evaluate retrieval (PDR vs the content baseline)
  -> release gate (dsl.If): floors, not worse than the served version, PDR recall@200
  -> export a new model version with its metrics beside it
     -> export PDR's query tower and index beside that version (pdr_query/V, pdr_index/V)

Compile with `python -m pipelines.compile`; run on this machine with
`python -m pipelines.run_local`.
"""
from kfp import dsl

from pipelines import components

PIPELINE_NAME = "qin-search-ranking"
# Accelerator for the train and train_pdr steps on Vertex AI (ignored by local runs).
TRAIN_ACCELERATOR = "NVIDIA_TESLA_T4"


@dsl.pipeline(name=PIPELINE_NAME,
              description="QIN personalized search: logs -> TFRecords -> QIN ranker, item-to-item "
                          "table and PDR retrieval -> release gate (floors, served version, "
                          "PDR recall@200) -> TF Serving model version with PDR beside it")
def qin_pipeline(
    input_format: str = "canonical",
    input_uri: str = "",
    users: int = 300,
    items: int = 1500,
    requests: int = 6000,
    lifelong_users: int = 0,
    seed: int = 7,
    long_term_length: int = 1000,
    real_time_length: int = 50,
    long_term_mode: str = "recent",
    preprocess_workers: int = 2,
    model_preset: str = "qin",
    model_config_json: str = "",
    epochs: int = 3,
    batch_size: int = 64,
    pdr_config_json: str = "",
    pdr_epochs: int = 3,
    pdr_batch_size: int = 128,
    retrieval_max_requests: int = 2000,
    min_click_gauc: float = 0.55,
    min_click_auc: float = 0.55,
    min_gain_over_served: float = 0.0,
    min_pdr_recall: float = 0.0,
    max_pdr_recall_below_content: float = 0.02,
    model_base_path: str = "models",
    model_name: str = "qin",
):
    raw = components.acquire_raw_logs(
        input_format=input_format, input_uri=input_uri, users=users, items=items,
        requests=requests, lifelong_users=lifelong_users, seed=seed)
    data = components.preprocess(
        raw_uri=raw.outputs["Output"], input_format=input_format,
        long_term_length=long_term_length, real_time_length=real_time_length,
        long_term_mode=long_term_mode, workers=preprocess_workers)
    trained = components.train(
        data=data.outputs["data"], model_preset=model_preset, config_json=model_config_json,
        epochs=epochs, batch_size=batch_size, seed=seed)
    trained.set_cpu_limit("8").set_memory_limit("32G")
    trained.set_accelerator_type(TRAIN_ACCELERATOR).set_accelerator_limit(1)
    trained.set_retry(num_retries=2)  # checkpoints make a retried train step resume
    evaluation = components.evaluate(
        data=data.outputs["data"], model=trained.outputs["model"], split="test")
    item_to_item = components.build_item_to_item(
        data=data.outputs["data"], workers=preprocess_workers)
    pdr = components.train_pdr(
        data=data.outputs["data"], config_json=pdr_config_json, epochs=pdr_epochs,
        batch_size=pdr_batch_size, seed=seed)
    pdr.set_cpu_limit("8").set_memory_limit("32G")
    pdr.set_accelerator_type(TRAIN_ACCELERATOR).set_accelerator_limit(1)
    pdr.set_retry(num_retries=2)  # resumes from its checkpoints too
    retrieval = components.evaluate_retrieval(
        data=data.outputs["data"], item_to_item=item_to_item.outputs["item_to_item"],
        pdr_model=pdr.outputs["pdr_model"], split="test", max_requests=retrieval_max_requests)
    gate = components.release_gate(
        metrics=evaluation.outputs["metrics"], retrieval_metrics=retrieval.outputs["metrics"],
        model_base_path=model_base_path, model_name=model_name, min_click_gauc=min_click_gauc,
        min_click_auc=min_click_auc, min_gain_over_served=min_gain_over_served,
        min_pdr_recall=min_pdr_recall,
        max_pdr_recall_below_content=max_pdr_recall_below_content)
    with dsl.If(gate.outputs["Output"] == True, name="release-gate"):  # noqa: E712 (KFP)
        exported = components.export_model(
            data=data.outputs["data"], model=trained.outputs["model"],
            metrics=evaluation.outputs["metrics"], base_path=model_base_path,
            model_name=model_name)
        components.export_retrieval(
            data=data.outputs["data"], pdr_model=pdr.outputs["pdr_model"],
            retrieval_metrics=retrieval.outputs["metrics"], base_path=model_base_path,
            model_name=model_name, version=exported.outputs["version"])
