"""``vision``: Google Cloud Vision label detection, scored against the recipe's terms."""

from __future__ import annotations

from harvest.core import Float, Int, LabelScorer, Option, PluginConfigError, Secret, Str, hookimpl

# google-cloud-vision is imported when the plugin opens: it takes a tenth of a second and
# tens of MB, which recipes that do not score should not pay.


class VisionScorer(LabelScorer):
    """Scores each picture for each term with Cloud Vision label detection."""

    score_source = "google-cloud-vision"
    batch_limit = 16  # images per images:annotate request, Vision's documented maximum

    options = LabelScorer.options + (
        Option("api_key", Secret(), "${GOOGLE_VISION_KEY}", help="Cloud Vision API key reference"),
        Option("endpoint", Str(), "https://vision.googleapis.com", help="API endpoint"),
        Option("max_labels", Int(1, 100), 50, help="labels asked for per image"),
        Option("timeout", Float(1, 600), 60.0, help="seconds per request"),
        Option("retry_for", Float(0, 3600), 120.0,
               help="seconds to keep retrying quota (429) and 5xx errors, with backoff"),
    )

    def open(self) -> None:
        import requests
        from google.api_core import exceptions as google_errors
        from google.api_core.client_options import ClientOptions
        from google.api_core.retry import Retry, if_exception_type
        from google.cloud import vision

        super().open()
        self.vision = vision
        transient = (google_errors.TooManyRequests, google_errors.ServiceUnavailable,
                     google_errors.InternalServerError, google_errors.BadGateway,
                     google_errors.GatewayTimeout, requests.exceptions.ConnectionError)
        self.refused = (google_errors.Unauthenticated, google_errors.PermissionDenied,
                        google_errors.Forbidden)
        self.client = vision.ImageAnnotatorClient(
            transport="rest",
            client_options=ClientOptions(api_endpoint=self.config["endpoint"],
                                         api_key=self.config["api_key"].reveal()))
        self.retry = Retry(predicate=if_exception_type(*transient), initial=0.5, maximum=30,
                           multiplier=2, timeout=self.config["retry_for"])

    def labels(self, images: list[bytes]) -> list[dict[str, float] | Exception]:
        vision = self.vision
        feature = vision.Feature(type_=vision.Feature.Type.LABEL_DETECTION,
                                 max_results=self.config["max_labels"])
        requests_ = [vision.AnnotateImageRequest(image=vision.Image(content=image),
                                                 features=[feature]) for image in images]
        try:
            reply = self.client.batch_annotate_images(requests=requests_, retry=self.retry,
                                                      timeout=self.config["timeout"])
        except self.refused as exc:
            raise PluginConfigError(f"{self.context.name}: Cloud Vision refused the API key: "
                                    f"{exc.message}") from None
        results: list[dict[str, float] | Exception] = []
        for response in reply.responses:
            if response.error.message:
                results.append(RuntimeError(f"Vision: {response.error.message}"))
                continue
            labels: dict[str, float] = {}
            for annotation in response.label_annotations:
                name = annotation.description.casefold()
                labels[name] = max(labels.get(name, 0.0), round(annotation.score, 4))
            results.append(labels)
        return results


@hookimpl
def harvest_enrichers():
    return {"vision": VisionScorer}
