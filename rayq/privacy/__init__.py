"""Privacy of compressed updates: gradient-inversion attacks on what the wire carries, leakage metrics,
distance correlation (NoPeek) and membership inference."""

from rayq.privacy.attacks import (
    AttackResult, DLGBudget, Distance, GradientObjective, IGBudget, Knowledge, View, analytic_fc_inversion,
    candidate_gradients, dlg, idlg_labels, inverting_gradients, straight_through, total_variation,
)
from rayq.privacy.dcor import bias_corrected_dcor2, distance_correlation, nopeek_loss, pairwise_distances
from rayq.privacy.leak import (
    IMAGE_FORMATS, AttackName, ImageData, LabelSource, LeakConfig, LeakReport, LeakRow, default_codecs, load_images,
    report_codecs, run_leak,
)
from rayq.privacy.membership import (
    AlignmentAttack, MembershipProbe, MembershipReport, ThresholdAttack, correctness_attack_accuracy,
    gaussian_threshold_success, gradient_alignment_attack, loss_threshold_attack, membership_report,
    per_sample_gradients, per_sample_losses, roc_auc, threshold_attack, tpr_at_fpr, yeom_bound,
)
from rayq.privacy.metrics import (
    SUCCESS_PSNR_DB, SUCCESS_SSIM, ImageScores, Normalization, is_success, label_accuracy, match_batch, mse, psnr,
    score_images, ssim,
)
from rayq.privacy.report import (
    WrittenReport, markdown_table, write_all, write_json, write_markdown, write_png_grids, write_tensorboard,
)
from rayq.privacy.split import (
    DecoderAttack, DecoderLeakage, SplitModel, SplitStep, SplitTraining, decoder_attack, decoder_leakage,
    mlp_decoder, smashed_bits, split_accuracy, split_cnn, split_step, train_decoder_attack, train_split,
)
from rayq.privacy.victims import (
    InputSpec, VictimKind, batch_gradient, build_victim, lenet_sigmoid, mlp_victim, soft_cross_entropy,
)
from rayq.privacy.wire import (
    CodecSpec, ErrorFeedbackMode, LayerRule, ParamObservation, RandomPrecision, WireCapture, capture, transmit,
)

__all__ = [
    "IMAGE_FORMATS", "AlignmentAttack", "AttackName", "DecoderAttack", "decoder_attack",
    "AttackResult", "CodecSpec", "DLGBudget", "DecoderLeakage", "Distance",
    "ErrorFeedbackMode", "SplitModel", "SplitStep", "SplitTraining", "decoder_leakage", "mlp_decoder", "smashed_bits",
    "split_accuracy", "split_cnn", "split_step", "train_decoder_attack", "train_split",
    "GradientObjective", "IGBudget", "ImageData", "ImageScores", "InputSpec", "Knowledge", "LabelSource", "LayerRule",
    "LeakConfig", "LeakReport", "LeakRow", "MembershipProbe", "MembershipReport", "Normalization", "ParamObservation",
    "RandomPrecision",
    "SUCCESS_PSNR_DB", "SUCCESS_SSIM", "ThresholdAttack", "VictimKind", "View", "WireCapture", "WrittenReport",
    "analytic_fc_inversion", "batch_gradient", "bias_corrected_dcor2", "build_victim", "candidate_gradients", "capture",
    "correctness_attack_accuracy", "default_codecs", "distance_correlation", "dlg", "gaussian_threshold_success",
    "gradient_alignment_attack", "idlg_labels", "inverting_gradients", "is_success", "label_accuracy", "lenet_sigmoid",
    "load_images", "loss_threshold_attack", "markdown_table", "match_batch", "membership_report", "mlp_victim", "mse",
    "nopeek_loss", "pairwise_distances", "per_sample_gradients", "per_sample_losses", "psnr", "report_codecs",
    "roc_auc",
    "run_leak", "score_images", "soft_cross_entropy", "ssim", "straight_through", "threshold_attack", "total_variation",
    "tpr_at_fpr", "transmit", "write_all", "write_json", "write_markdown", "write_png_grids", "write_tensorboard",
    "yeom_bound",
]
