"""trainer stage of the QIN personalized search ranking system."""
import common  # noqa: F401  (switches TensorFlow to tf-keras before it loads)
