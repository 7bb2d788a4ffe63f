"""Images for training and evaluation: datasets by name and the grain input pipeline.

No TensorFlow anywhere: TFDS datasets are read as ArrayRecord with `as_data_source`.
"""

from jaxdiff.data.pipeline import GlobalBatchIterator
from jaxdiff.data.pipeline import host_eval_batches
from jaxdiff.data.pipeline import host_train_batches
from jaxdiff.data.pipeline import load_split_numpy
from jaxdiff.data.pipeline import make_eval_iterator
from jaxdiff.data.pipeline import make_train_iterator
from jaxdiff.data.sources import available_datasets
from jaxdiff.data.sources import check_model_compatible
from jaxdiff.data.sources import dataset_info
from jaxdiff.data.sources import DatasetInfo
from jaxdiff.data.sources import DatasetNotPreparedError
from jaxdiff.data.sources import FOLDER_PREFIX
from jaxdiff.data.sources import PACKAGED_DATASETS
from jaxdiff.data.sources import unknown_dataset_error
