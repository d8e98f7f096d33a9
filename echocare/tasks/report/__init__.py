"""Report generation (``usreport``): tokenizer, data, network, text metrics, engine."""

from echocare.tasks.report.metrics import FindingsVocabulary, REPORT_METRIC_NAMES, ReportScore, corpus_bleu, findings_scores, meteor, metric_tokens, report_metrics, report_scores, rouge_l, single_meteor, single_rouge_l
from echocare.tasks.report.network import EchoCareReportNet, ReportLoss, beam_search, greedy_search
from echocare.tasks.report.data import ReportTokensd, StackImagesd, list_report_cases, load_report_datalist, train_report_tokenizer
from echocare.tasks.report.tokenizer import ReportTokenizer, SPECIAL_TOKENS, TokenizerError, is_cjk, split_text
from echocare.tasks.report.engine import ReportEvalIteration, ReportTrainIteration, ReportWriter

__all__ = ["EchoCareReportNet", "FindingsVocabulary", "REPORT_METRIC_NAMES", "ReportEvalIteration", "ReportLoss", "ReportScore", "ReportTokenizer", "ReportTokensd", "ReportTrainIteration", "ReportWriter", "SPECIAL_TOKENS", "StackImagesd", "TokenizerError", "beam_search", "corpus_bleu", "findings_scores", "greedy_search", "is_cjk", "list_report_cases", "load_report_datalist", "meteor", "metric_tokens", "report_metrics", "report_scores", "rouge_l", "single_meteor", "single_rouge_l", "split_text", "train_report_tokenizer"]
