from agecls.data.datamodule import AgeDataModule, EmptyDatasetError

__all__ = ["AgeDataModule", "EmptyDatasetError"]
