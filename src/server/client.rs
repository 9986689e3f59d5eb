//! A client of the edit service (what `ip2p edit --server` uses): the one mapping from
//! [`EditParams`] to a request, next to the server's mapping back ([`super::validate`]), and
//! a connection that sends a bearer token with every call.

use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use super::proto::{self, image_editor_client::ImageEditorClient};
use crate::pipeline::{EditParams, ResizePolicy};
use crate::{Error, Result};

impl From<ResizePolicy> for proto::ResizePolicy {
    fn from(p: ResizePolicy) -> Self {
        match p {
            ResizePolicy::Paper => Self::Paper,
            ResizePolicy::Native => Self::Native,
        }
    }
}

impl From<&EditParams> for proto::EditRequest {
    /// Every parameter of `p` (the image and output format are the caller's to set; the
    /// working-size flag has no field in the protocol).
    fn from(p: &EditParams) -> Self {
        Self {
            instruction: p.instruction.clone(),
            negative_prompt: (!p.negative_prompt.is_empty()).then(|| p.negative_prompt.clone()),
            steps: u32::try_from(p.steps).ok(),
            text_guidance: Some(p.text_guidance as f32),
            image_guidance: Some(p.image_guidance as f32),
            seed: Some(p.seed),
            scheduler: p.scheduler.map(|s| s.name().to_owned()).unwrap_or_default(),
            resolution: Some(p.resolution),
            resize: proto::ResizePolicy::from(p.resize) as i32,
            ..Default::default()
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// `None`: no header. A token that is not a valid header value is an error.
    pub fn new(token: Option<&str>) -> Result<Self> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::invalid("token", "not a valid header value"))
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut r: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// The service's client with its token.
pub type Client = ImageEditorClient<InterceptedService<Channel, BearerToken>>;

/// Connects to `url` (e.g. `http://127.0.0.1:50051`); messages of any size are accepted.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client> {
    let token = BearerToken::new(token)?;
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::invalid("server", format!("bad address {url}: {e}")))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("connecting to {url}: {e}")))?;
    Ok(ImageEditorClient::with_interceptor(channel, token).max_decoding_message_size(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::SchedulerKind;

    #[test]
    fn edit_params_map_to_the_request_the_server_validates_back() {
        let p = EditParams {
            instruction: "make it night".into(),
            negative_prompt: "blurry".into(),
            steps: 12,
            text_guidance: 6.0,
            image_guidance: 1.25,
            scheduler: Some(SchedulerKind::Ddim),
            seed: 99,
            resolution: 256,
            resize: ResizePolicy::Native,
            keep_working_size: false,
        };
        let mut req = proto::EditRequest::from(&p);
        assert_eq!(req.steps, Some(12));
        assert_eq!(req.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(req.resize, proto::ResizePolicy::Native as i32);
        let img = image::RgbImage::from_pixel(64, 48, image::Rgb([1, 2, 3]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("png");
        req.image = Some(proto::Image {
            data: Some(proto::image::Data::Encoded(png)),
        });
        let job = super::super::validate::validate(&req, &super::super::ServerConfig::default())
            .expect("valid");
        assert_eq!(job.params, p);
    }

    #[test]
    fn a_token_that_is_not_a_header_value_is_an_error() {
        assert!(BearerToken::new(Some("bad\ntoken")).is_err());
        assert!(BearerToken::new(Some("good")).is_ok());
        assert!(BearerToken::new(None).is_ok());
    }
}
