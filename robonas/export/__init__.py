"""From a trained trial to a deployable artifact: the deployable actor (normalisation and action
post-processing folded in), conversion to float or int8 TFLite, the parity check, and the
artifact on disk (model, manifest, signature).
"""
